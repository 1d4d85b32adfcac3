//! The model without a kernel: placement, eligibility, slow start, the
//! candidate index, reload plans and adoption.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_common::{Backend, BackendSet, BACKEND_ELIGIBLE, MAX_BACKENDS, SCHEDULER_RANDOM_TWO};

use crate::fixtures::{addr, service, vip};

use super::{plan::plan, *};
use crate::{
    api::{Admin, BackendState},
    config::{Config, DownPolicy, HealthConfig, Scheduler},
    datapath::wire_addr,
    model::health::Change,
};

fn no_flows(_: u32) -> anyhow::Result<Vec<u64>> {
    Ok(vec![0; MAX_BACKENDS as usize])
}

/// A model with one service "web" on vip(0) over `weights`.
fn web(weights: &[u32]) -> Model {
    let mut model = Model::default();
    model.add_service(&service("web", vip(0), weights), 16, &no_flows, Instant::now()).unwrap();
    model
}

fn counts(slots: &[u64]) -> Vec<u64> {
    let mut all = vec![0; MAX_BACKENDS as usize];
    all[..slots.len()].copy_from_slice(slots);
    all
}

fn slot_addresses(s: &Service) -> Vec<Option<SocketAddrV4>> {
    s.slots
        .iter()
        .map(|slot| match slot {
            Slot::Used(m) => Some(m.config.address),
            Slot::Free => None,
        })
        .collect()
}

// Placement.

#[test]
fn backends_take_slots_in_order_and_start_fresh() {
    let mut model = Model::default();
    let placed = model.add_service(&service("web", vip(0), &[1, 1, 1]), 16, &no_flows, Instant::now()).unwrap();
    assert_eq!(placed.iter().map(|p| (p.slot, p.fresh)).collect::<Vec<_>>(), [(0, true), (1, true), (2, true)]);
    assert_eq!(slot_addresses(&model.services[0]), [Some(addr(1)), Some(addr(2)), Some(addr(3))]);
}

#[test]
fn a_removed_backend_with_flows_keeps_its_slot_and_a_new_one_goes_after_it() {
    let mut model = web(&[1, 1]);
    model.apply(&Step::RemoveBackend { service: "web".into(), address: addr(1) }, 16, &no_flows, Instant::now()).unwrap();
    let placed = model.add_backend("web", &BackendConfig::new(addr(3), 1), &|_| Ok(counts(&[4])), Instant::now()).unwrap();
    assert_eq!((placed.slot, placed.fresh), (2, true), "slot 0 still holds 4 flows of the removed backend");
    assert_eq!(model.services[0].members().filter(|(_, m)| m.removed).count(), 1);
}

#[test]
fn a_removed_backend_whose_flows_are_gone_gives_its_slot_to_a_new_one() {
    let mut model = web(&[1, 1]);
    model.update_member("web", addr(1), |m| { m.removed = true; "removed".into() }).unwrap();
    let placed = model.add_backend("web", &BackendConfig::new(addr(3), 1), &no_flows, Instant::now()).unwrap();
    assert_eq!((placed.slot, placed.fresh), (0, true));
    assert_eq!(slot_addresses(&model.services[0]), [Some(addr(3)), Some(addr(2))]);
}

#[test]
fn a_backend_coming_back_before_its_flows_finished_gets_its_old_slot_and_statistics() {
    let mut model = web(&[1, 1, 1]);
    model.update_member("web", addr(2), |m| { m.removed = true; "removed".into() }).unwrap();
    let placed = model.add_backend("web", &BackendConfig::new(addr(2), 5), &|_| Ok(counts(&[0, 3])), Instant::now()).unwrap();
    assert_eq!((placed.slot, placed.fresh), (1, false));
    let s = &model.services[0];
    assert_eq!(s.configured().count(), 3);
    assert_eq!(s.members().find(|(i, _)| *i == 1).unwrap().1.config.weight, 5);
}

#[test]
fn a_backend_twice_and_a_backend_too_many_are_refused() {
    let mut model = web(&[1]);
    let err = model.add_backend("web", &BackendConfig::new(addr(1), 1), &no_flows, Instant::now()).unwrap_err();
    assert!(err.to_string().contains("already has backend"), "{err}");
    let mut full = Model::default();
    let mut config = service("big", vip(1), &[]);
    config.backends = (0..MAX_BACKENDS)
        .map(|i| BackendConfig::new(SocketAddrV4::new(Ipv4Addr::new(198, 19, (i / 200) as u8, 1 + (i % 200) as u8), 80), 1))
        .collect();
    full.add_service(&config, 16, &no_flows, Instant::now()).unwrap();
    let err = full.add_backend("big", &BackendConfig::new(addr(200), 1), &no_flows, Instant::now()).unwrap_err();
    assert!(err.to_string().contains("already has 256 backends"), "{err}");
}

#[test]
fn reclaim_frees_only_slots_of_removed_backends_with_no_flows_and_trims_the_tail() {
    let mut model = web(&[1, 1, 1]);
    for a in [addr(1), addr(3)] {
        model.update_member("web", a, |m| { m.removed = true; "removed".into() }).unwrap();
    }
    model.services[0].reclaim(&counts(&[2, 0, 0]));
    assert_eq!(slot_addresses(&model.services[0]), [Some(addr(1)), Some(addr(2))], "slot 0 still has flows");
    model.services[0].reclaim(&counts(&[0, 0]));
    assert_eq!(slot_addresses(&model.services[0]), [None, Some(addr(2))]);
}

// Services and ids.

#[test]
fn service_ids_skip_those_in_use_and_retired_and_run_out_with_a_clear_error() {
    let mut model = Model::default();
    for i in 0..3 {
        model.add_service(&service(&format!("s{i}"), vip(i), &[1]), 4, &no_flows, Instant::now()).unwrap();
    }
    let removed = model.remove_service("s1").unwrap();
    assert_eq!(removed.id, 1);
    assert_eq!(model.retired, [1]);
    assert_eq!(model.free_id(4).unwrap(), 3, "a retired id waits for its flows");
    model.add_service(&service("s3", vip(3), &[1]), 4, &no_flows, Instant::now()).unwrap();
    let err = model.add_service(&service("s4", vip(4), &[1]), 4, &no_flows, Instant::now()).unwrap_err();
    assert!(err.to_string().contains("all 4 service slots are in use"), "{err}");
}

#[test]
fn a_second_service_with_the_same_name_or_vip_is_refused() {
    let mut model = web(&[1]);
    let err = model.add_service(&service("web", vip(1), &[1]), 16, &no_flows, Instant::now()).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let err = model.add_service(&service("api", vip(0), &[1]), 16, &no_flows, Instant::now()).unwrap_err();
    assert!(err.to_string().contains("already used by service \"web\""), "{err}");
    assert_eq!(model.services.len(), 1);
}

// Eligibility.

#[test]
fn draining_disabled_and_removed_backends_take_no_new_flows() {
    let mut model = web(&[1, 1, 1, 1]);
    let now = Instant::now();
    model.update_member("web", addr(1), |m| { m.admin = Admin::Draining; "d".into() }).unwrap();
    model.update_member("web", addr(2), |m| { m.admin = Admin::Disabled; "d".into() }).unwrap();
    model.update_member("web", addr(3), |m| { m.removed = true; "r".into() }).unwrap();
    model.services[0].decide(now);
    let states: Vec<(BackendState, bool)> = model.services[0].members().map(|(_, m)| (m.state(now), m.eligible)).collect();
    assert_eq!(
        states,
        [
            (BackendState::Draining, false),
            (BackendState::Disabled, false),
            (BackendState::Removing, false),
            (BackendState::Up, true)
        ]
    );
}

#[test]
fn with_policy_reset_a_backend_that_dies_has_its_flows_reset_but_a_drained_one_does_not() {
    let mut model = web(&[1, 1, 1]);
    model.services[0].on_down = DownPolicy::Reset;
    let now = Instant::now();
    model.update_member("web", addr(1), |m| { m.admin = Admin::Draining; "d".into() }).unwrap();
    model.update_member("web", addr(2), |m| { m.admin = Admin::Disabled; "d".into() }).unwrap();
    assert_eq!(model.services[0].decide(now), [1], "only the disabled one");
    assert_eq!(model.services[0].decide(now), Vec::<u16>::new(), "once, when it goes");
    model.services[0].on_down = DownPolicy::Keep;
    model.update_member("web", addr(3), |m| { m.admin = Admin::Disabled; "d".into() }).unwrap();
    assert_eq!(model.services[0].decide(now), Vec::<u16>::new(), "policy keep resets nothing");
}

#[test]
fn passive_failures_take_a_backend_down_and_a_passing_check_brings_it_back() {
    let mut model = web(&[1, 1]);
    let now = Instant::now();
    let m = model.service_mut("web").unwrap().member_mut(addr(1)).unwrap();
    assert!(matches!(m.health.record_passive(1, now, 1, Duration::from_secs(10)), Some(Change::Down(_))));
    model.services[0].decide(now);
    let first = model.services[0].members().next().unwrap().1;
    assert_eq!((first.state(now), first.eligible), (BackendState::Down, false));
    let m = model.service_mut("web").unwrap().member_mut(addr(1)).unwrap();
    let ok = crate::api::CheckResult { ok: true, latency_ms: 1.0, detail: "connected".into() };
    // Up by active checks already: the passive hold ends at the next pass.
    assert!(matches!(m.health.record_check(ok, 2, 3), Some(Change::Up(_))));
    model.services[0].decide(now);
    assert!(model.services[0].members().next().unwrap().1.eligible);
}

// Slow start and the backend set.

#[test]
fn slow_start_caps_a_new_backend_at_its_growing_share_of_the_tier() {
    let t0 = Instant::now();
    let mut model = web(&[1, 1]);
    let mut ramping = BackendConfig::new(addr(3), 2);
    ramping.slow_start = 10.0;
    model.add_backend("web", &ramping, &no_flows, t0).unwrap();
    let s = &mut model.services[0];
    s.decide(t0);
    assert_eq!(s.members().nth(2).unwrap().1.state(t0), BackendState::SlowStart);
    // 100 connections on the tier, weights 1+1+2: a fair share of 50.
    let active = counts(&[50, 50, 0]);
    let cap = |at: Duration| s.backend_set(&active, t0 + at).slots[2].max_conns;
    assert_eq!(cap(Duration::ZERO), 1, "at least one connection");
    assert_eq!(cap(Duration::from_secs(2)), 10, "a fifth of the way: a fifth of 50");
    assert_eq!(cap(Duration::from_secs(5)), 25);
    assert_eq!(s.backend_set(&active, t0).slots[0].max_conns, 0, "the others are not capped");
}

#[test]
fn slow_start_ends_after_its_time_and_a_smaller_max_conns_wins_meanwhile() {
    let t0 = Instant::now();
    let mut model = web(&[1]);
    let mut ramping = BackendConfig::new(addr(2), 1);
    ramping.slow_start = 4.0;
    ramping.max_conns = 3;
    model.add_backend("web", &ramping, &no_flows, t0).unwrap();
    let s = &mut model.services[0];
    s.decide(t0);
    assert_eq!(s.backend_set(&counts(&[100, 0]), t0 + Duration::from_secs(2)).slots[1].max_conns, 3);
    s.decide(t0 + Duration::from_secs(5));
    let now = t0 + Duration::from_secs(5);
    assert_eq!(s.members().nth(1).unwrap().1.state(now), BackendState::Up);
    assert_eq!(s.backend_set(&counts(&[100, 0]), now).slots[1].max_conns, 3, "only max_conns after the ramp");
}

#[test]
fn a_backend_coming_back_up_ramps_again() {
    let t0 = Instant::now();
    let mut model = Model::default();
    let mut config = service("web", vip(0), &[1]);
    config.backends[0].slow_start = 5.0;
    model.add_service(&config, 16, &no_flows, t0).unwrap();
    let s = &mut model.services[0];
    s.decide(t0 + Duration::from_secs(6));
    assert_eq!(s.members().next().unwrap().1.state(t0 + Duration::from_secs(6)), BackendState::Up);
    s.member_mut(addr(1)).unwrap().admin = Admin::Disabled;
    s.decide(t0 + Duration::from_secs(7));
    s.member_mut(addr(1)).unwrap().admin = Admin::Enabled;
    s.decide(t0 + Duration::from_secs(8));
    assert_eq!(s.members().next().unwrap().1.state(t0 + Duration::from_secs(8)), BackendState::SlowStart);
}

#[test]
fn the_backend_set_carries_addresses_tiers_weights_and_eligibility() {
    let mut config = service("web", vip(0), &[3, 1, 0]);
    config.backends[1].backup = true;
    config.scheduler = Scheduler::RandomTwoLeastConn;
    let mut model = Model::default();
    model.add_service(&config, 16, &no_flows, Instant::now()).unwrap();
    let set = model.services[0].backend_set(&counts(&[]), Instant::now());
    assert_eq!(set.len, 3);
    assert_eq!(set.scheduler, SCHEDULER_RANDOM_TWO);
    assert_eq!(
        set.slots[0],
        Backend {
            addr: wire_addr(*addr(1).ip()),
            port: 80u16.to_be(),
            flags: BACKEND_ELIGIBLE,
            tier: 0,
            weight: 3,
            max_conns: 0,
            snat_addr: 0
        }
    );
    assert_eq!((set.slots[1].tier, set.slots[1].weight), (1, 1));
    // The candidates: the primary first, then the backup; weight 0 none.
    assert_eq!(set.candidate_count, 2);
    assert_eq!(set.lowest_tier_count, 1);
    assert_eq!((set.candidates[0].slot, set.candidates[1].slot), (0, 1));
}

#[test]
fn the_candidate_index_follows_eligibility_changes() {
    let mut model = web(&[1, 1, 1]);
    let now = Instant::now();
    model.update_member("web", addr(2), |m| { m.admin = Admin::Draining; "d".into() }).unwrap();
    model.services[0].decide(now);
    let set = model.services[0].backend_set(&counts(&[]), now);
    assert_eq!(set.candidate_count, 2);
    assert_eq!((set.candidates[0].slot, set.candidates[1].slot), (0, 2));
    assert_eq!(set.slots[1].flags & BACKEND_ELIGIBLE, 0, "still in its slot, not a candidate");
}

// Reload plans.

fn config(services: Vec<ServiceConfig>) -> Config {
    Config { services, ..Config::default() }
}

#[test]
fn the_same_config_plans_nothing() {
    let model = web(&[1, 2]);
    assert_eq!(plan(&model, &config(vec![service("web", vip(0), &[1, 2])])), []);
}

#[test]
fn a_changed_scheduler_or_health_check_is_planned_and_applied() {
    let mut model = web(&[1]);
    let mut new = service("web", vip(0), &[1]);
    new.scheduler = Scheduler::RandomTwoLeastConn;
    new.health = Some(HealthConfig::default());
    let steps = plan(&model, &config(vec![new.clone()]));
    assert_eq!(steps, [Step::Configure(new)]);
    assert_eq!(steps[0].to_string(), "web: scheduler, mode, health checks or down policy changed");
    model.apply(&steps[0], 16, &no_flows, Instant::now()).unwrap();
    assert_eq!(model.services[0].scheduler, Scheduler::RandomTwoLeastConn);
    assert_eq!(model.check_targets().len(), 1);
}

#[test]
fn backends_added_removed_and_changed_are_planned_with_their_messages() {
    let model = web(&[1, 1]);
    let mut new = service("web", vip(0), &[3]);
    new.backends.push(BackendConfig::new(addr(9), 1));
    let steps: Vec<String> = plan(&model, &config(vec![new])).iter().map(|s| s.to_string()).collect();
    assert_eq!(
        steps,
        [
            "web: removed backend 198.19.0.12:80",
            "web: changed backend 198.19.0.11:80",
            "web: added backend 198.19.0.19:80"
        ]
    );
}

#[test]
fn services_removed_added_and_moved_to_another_vip_are_planned_removals_first() {
    let mut model = web(&[1]);
    model.add_service(&service("api", vip(1), &[1]), 16, &no_flows, Instant::now()).unwrap();
    let steps = plan(&model, &config(vec![service("new", vip(1), &[1]), service("web", vip(2), &[1])]));
    let names: Vec<String> = steps.iter().map(|s| s.to_string()).collect();
    assert_eq!(names, ["removed service web (VIP changed)", "removed service api", "added service new", "added service web"]);
    // The VIP api had is free for "new" by the time it is added.
    let mut applied = model.clone();
    for step in &steps {
        applied.apply(step, 16, &no_flows, Instant::now()).unwrap();
    }
    let vips: Vec<(String, SocketAddrV4)> = applied.services.iter().map(|s| (s.name.clone(), s.vip)).collect();
    assert_eq!(vips, [("new".to_string(), vip(1)), ("web".to_string(), vip(2))]);
    assert_eq!(applied.retired, [0, 1]);
}

#[test]
fn drains_survive_a_reload_that_changes_the_backend() {
    let mut model = web(&[1]);
    model.update_member("web", addr(1), |m| { m.admin = Admin::Draining; "d".into() }).unwrap();
    let steps = plan(&model, &config(vec![service("web", vip(0), &[4])]));
    model.apply(&steps[0], 16, &no_flows, Instant::now()).unwrap();
    let m = model.services[0].members().next().unwrap().1;
    assert_eq!((m.config.weight, m.admin), (4, Admin::Draining));
}

// Adoption.

fn pinned(set_backends: &[(u8, bool)]) -> BackendSet {
    let mut set = BackendSet { len: set_backends.len() as u32, scheduler: SCHEDULER_RANDOM_TWO, ..Default::default() };
    for (i, (a, eligible)) in set_backends.iter().enumerate() {
        set.slots[i] = Backend {
            addr: wire_addr(*addr(*a).ip()),
            port: 80u16.to_be(),
            flags: if *eligible { BACKEND_ELIGIBLE } else { 0 },
            tier: 0,
            weight: 1,
            max_conns: 0,
            snat_addr: 0,
        };
    }
    set
}

#[test]
fn adopted_services_keep_their_ids_and_slots_and_take_no_new_flows_until_claimed() {
    let mut model = Model::default();
    model.adopt(&[(vip(0), 7, pinned(&[(1, true), (2, true)]))], Instant::now());
    let s = &model.services[0];
    assert_eq!((s.id, s.adopted, s.scheduler), (7, true, Scheduler::RandomTwoLeastConn));
    assert!(s.members().all(|(_, m)| m.removed && m.eligible));
    assert_eq!(model.unclaimed(), ["(adopted 198.18.1.100:80)"]);

    // The config claims it with the backends in another order and one new.
    let mut config = service("web", vip(0), &[]);
    config.backends = vec![BackendConfig::new(addr(2), 1), BackendConfig::new(addr(3), 1), BackendConfig::new(addr(1), 1)];
    let placed = model.add_service(&config, 16, &|_| Ok(counts(&[5, 6])), Instant::now()).unwrap();
    assert_eq!(
        placed.iter().map(|p| (p.service, p.slot, p.fresh)).collect::<Vec<_>>(),
        [(7, 1, false), (7, 2, true), (7, 0, false)],
        "each backend is back in the slot holding its flows' counts"
    );
    assert!(model.unclaimed().is_empty());
    assert_eq!(model.services[0].name, "web");
}

#[test]
fn a_backend_of_an_adopted_service_that_the_config_drops_stays_until_its_flows_end() {
    let mut model = Model::default();
    model.adopt(&[(vip(0), 0, pinned(&[(1, true), (2, false)]))], Instant::now());
    model.add_service(&service("web", vip(0), &[1]), 16, &|_| Ok(counts(&[0, 3])), Instant::now()).unwrap();
    let states: Vec<(SocketAddrV4, BackendState)> =
        model.services[0].members().map(|(_, m)| (m.config.address, m.state(Instant::now()))).collect();
    assert_eq!(states, [(addr(1), BackendState::Up), (addr(2), BackendState::Removing)]);
    assert_eq!(model.check_targets(), [], "no health checks without [service.health]");
}

#[test]
fn health_checks_run_for_configured_backends_only() {
    let mut config = service("web", vip(0), &[1, 1]);
    config.health = Some(HealthConfig::default());
    let mut model = Model::default();
    model.add_service(&config, 16, &no_flows, Instant::now()).unwrap();
    model.update_member("web", addr(2), |m| { m.removed = true; "r".into() }).unwrap();
    let targets: Vec<SocketAddrV4> = model.check_targets().iter().map(|t| t.address).collect();
    assert_eq!(targets, [addr(1)]);
}
