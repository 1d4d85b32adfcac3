//! Reconciliation against in-memory maps: what gets written, what a refused
//! request leaves alone, and what a restarted agent takes over.

use lb_common::{
    BackendStats, Flow, FlowKey, BACKEND_ELIGIBLE, DIR_FORWARD, FLOW_ESTABLISHED, HALF_OPEN_ONE, SCHEDULER_RANDOM_TWO,
};

use crate::fixtures::{addr, service, vip};

use super::Balancer;
use crate::{
    api::{Admin, BackendState, CheckResult},
    config::{BackendConfig, Config, DownPolicy, HealthConfig, Scheduler},
    datapath::FakeMaps,
};

fn balancer(weights: &[u32]) -> Balancer<FakeMaps> {
    let mut b = Balancer::new(FakeMaps::new(4));
    b.add_service(&service("web", vip(0), weights)).unwrap();
    b
}

fn eligible(b: &Balancer<FakeMaps>, id: u32) -> Vec<bool> {
    let set = b.datapath.backend_set(id).unwrap();
    set.slots[..set.len as usize].iter().map(|s| s.flags & BACKEND_ELIGIBLE != 0).collect()
}

fn states(b: &Balancer<FakeMaps>) -> Vec<BackendState> {
    b.status().unwrap().services[0].backends.iter().map(|b| b.state).collect()
}

#[test]
fn a_new_service_is_written_backends_first_then_its_vip() {
    let b = balancer(&[1, 2]);
    assert_eq!(b.datapath.services.get(&vip(0)), Some(&0));
    let set = b.datapath.backend_set(0).unwrap();
    assert_eq!((set.len, set.candidate_count), (2, 2));
    assert_eq!(eligible(&b, 0), [true, true]);
    // Stats cleared for the two fresh slots, one backend set, one service.
    assert_eq!(b.datapath.writes, 4);
}

#[test]
fn a_refused_request_writes_nothing_and_changes_nothing() {
    let mut b = balancer(&[1]);
    let writes = b.datapath.writes;
    let err = b.add_service(&service("api", vip(0), &[1])).unwrap_err();
    assert!(err.to_string().contains("already used"), "{err}");
    assert!(b.add_backend("web", &BackendConfig::new(addr(1), 1)).is_err());
    assert!(b.set_weight("web", addr(1), 70_000).is_err());
    assert!(b.set_admin("web", addr(9), Admin::Draining).is_err());
    assert!(b.remove_service("nope").is_err());
    assert_eq!(b.datapath.writes, writes);
    assert_eq!(b.model.services.len(), 1);
}

#[test]
fn writes_happen_only_when_the_backend_set_changes() {
    let mut b = balancer(&[1, 1]);
    let writes = b.datapath.writes;
    b.tick().unwrap();
    b.reclaim().unwrap();
    assert_eq!(b.datapath.writes, writes, "nothing changed, nothing written");
    b.set_weight("web", addr(1), 5).unwrap();
    assert_eq!(b.datapath.writes, writes + 1);
    assert_eq!(b.datapath.backend_set(0).unwrap().slots[0].weight, 5);
}

#[test]
fn a_reload_that_changes_the_scheduler_writes_it() {
    let mut b = balancer(&[1, 1]);
    let mut new = service("web", vip(0), &[1, 1]);
    new.scheduler = Scheduler::RandomTwoLeastConn;
    let changes = b.reload(&Config { services: vec![new], ..Config::default() }).unwrap();
    assert_eq!(changes, ["web: scheduler, mode, health checks or down policy changed"]);
    assert_eq!(b.datapath.backend_set(0).unwrap().scheduler, SCHEDULER_RANDOM_TWO);
    assert_eq!(b.status().unwrap().services[0].scheduler, Scheduler::RandomTwoLeastConn);
}

#[test]
fn a_reload_whose_step_fails_leaves_the_running_config_and_maps_exactly_as_they_were() {
    // Room for two services; the reload removes a backend of "web" and then
    // needs a third service id, which is not there.
    let mut b = Balancer::new(FakeMaps::new(2));
    b.add_service(&service("web", vip(0), &[1, 1])).unwrap();
    b.add_service(&service("api", vip(1), &[1])).unwrap();
    let writes = b.datapath.writes;
    let config = Config {
        services: vec![service("web", vip(0), &[1]), service("api", vip(1), &[1]), service("new", vip(2), &[1])],
        ..Config::default()
    };
    let err = b.reload(&config).unwrap_err();
    assert!(err.to_string().contains("service slots are in use"), "{err}");
    assert_eq!(b.datapath.writes, writes, "no map written");
    assert_eq!(states(&b), [BackendState::Up, BackendState::Up], "web's second backend is still there");
    assert_eq!(b.model.services.len(), 2);
}

#[test]
fn a_removed_service_leaves_the_maps_and_its_id_waits_for_its_flows() {
    let mut b = balancer(&[1]);
    b.add_service(&service("api", vip(1), &[1])).unwrap();
    b.datapath.set_active(0, 0, 3);
    b.remove_service("web").unwrap();
    assert_eq!(b.datapath.services.get(&vip(0)), None, "no new flows for its VIP");
    assert_eq!(b.datapath.backend_set(0).unwrap().len, 0);
    b.reclaim().unwrap();
    assert_eq!(b.model.retired, [0], "3 flows still hold counts under id 0");
    b.add_service(&service("third", vip(2), &[1])).unwrap();
    assert_eq!(b.datapath.services.get(&vip(2)), Some(&2));
    b.datapath.set_active(0, 0, 0);
    b.reclaim().unwrap();
    assert!(b.model.retired.is_empty());
}

#[test]
fn a_removed_backend_keeps_its_slot_until_its_last_flow_is_gone() {
    let mut b = balancer(&[1, 1]);
    b.datapath.set_active(0, 1, 2);
    b.remove_backend("web", addr(2)).unwrap();
    assert_eq!(eligible(&b, 0), [true, false]);
    assert_eq!(states(&b), [BackendState::Up, BackendState::Removing]);
    b.reclaim().unwrap();
    assert_eq!(b.datapath.backend_set(0).unwrap().len, 2);
    b.datapath.set_active(0, 1, 0);
    b.reclaim().unwrap();
    assert_eq!(b.datapath.backend_set(0).unwrap().len, 1, "freed and trimmed");
}

#[test]
fn drain_takes_a_backend_out_of_new_flows_and_reports_its_connections() {
    let mut b = balancer(&[1, 1]);
    b.datapath.set_active(0, 0, 7);
    b.set_admin("web", addr(1), Admin::Draining).unwrap();
    assert_eq!(eligible(&b, 0), [false, true]);
    assert_eq!(b.active_of("web", addr(1)), Some(7));
    let status = b.status().unwrap();
    assert_eq!(status.services[0].backends[0].reason, "drained by operator");
    assert_eq!(status.services[0].active_connections, 7);
    b.set_admin("web", addr(1), Admin::Enabled).unwrap();
    assert_eq!(eligible(&b, 0), [true, true]);
}

#[test]
fn passive_failures_in_the_data_path_take_a_backend_down_and_a_passing_check_ends_the_hold() {
    let mut b = balancer(&[1, 1]);
    b.model.services[0].health = Some(HealthConfig::default());
    b.datapath.stats.insert((0, 1), BackendStats { refused: 1, ..Default::default() });
    b.tick().unwrap();
    assert_eq!(states(&b), [BackendState::Up, BackendState::Down]);
    assert_eq!(eligible(&b, 0), [true, false]);
    b.record_check("web", addr(2), CheckResult { ok: true, latency_ms: 1.0, detail: "HTTP 200".into() }).unwrap();
    assert_eq!(states(&b), [BackendState::Up, BackendState::Up]);
    assert_eq!(eligible(&b, 0), [true, true]);
    b.tick().unwrap();
    assert_eq!(eligible(&b, 0), [true, true], "the same failure is not counted twice");
}

#[test]
fn policy_reset_resets_the_live_flows_of_a_disabled_backend_only() {
    let mut config = service("web", vip(0), &[1, 1]);
    config.on_backend_down = DownPolicy::Reset;
    let mut b = Balancer::new(FakeMaps::new(4));
    b.add_service(&config).unwrap();
    let flow = |slot: u16, state: u32| Flow { service: 0, slot, state, direction: DIR_FORWARD, ..Flow::default() };
    let key = |port: u16| FlowKey { saddr: 1, daddr: 2, sport: port, dport: 80 };
    b.datapath.flows = vec![(key(1), flow(0, 0)), (key(2), flow(1, 0)), (key(3), flow(0, lb_common::FLOW_RESET))];
    b.set_admin("web", addr(1), Admin::Disabled).unwrap();
    assert_eq!(*b.datapath.resets.borrow(), [key(1)], "the live flow of slot 0, not slot 1's, not a closed one");
    b.set_admin("web", addr(2), Admin::Draining).unwrap();
    assert_eq!(b.datapath.resets.borrow().len(), 1, "a drain resets nothing");
}

#[test]
fn a_restarted_agent_takes_over_slots_counts_and_passive_failure_baselines() {
    let mut first = balancer(&[1, 1, 1]);
    first.datapath.set_active(0, 0, 4);
    first.datapath.set_active(0, 2, 1);
    // Each backend refused a handshake once, long ago.
    for slot in 0..3 {
        first.datapath.stats.insert((0, slot), BackendStats { refused: 1, new_flows: 10, ..Default::default() });
    }
    let maps = first.datapath.clone();

    let mut second = Balancer::new(maps);
    assert_eq!(second.adopt(), 1);
    let mut config = service("web", vip(0), &[]);
    config.backends = vec![BackendConfig::new(addr(3), 1), BackendConfig::new(addr(1), 1), BackendConfig::new(addr(2), 1)];
    second.add_service(&config).unwrap();
    second.finish_adoption().unwrap();
    second.tick().unwrap();
    let status = second.status().unwrap();
    let backends: Vec<(String, u64, u64, BackendState)> = status.services[0]
        .backends
        .iter()
        .map(|b| (b.address.clone(), b.active_connections, b.total_connections, b.state))
        .collect();
    assert_eq!(
        backends,
        [
            (addr(1).to_string(), 4, 10, BackendState::Up),
            (addr(2).to_string(), 0, 10, BackendState::Up),
            (addr(3).to_string(), 1, 10, BackendState::Up),
        ],
        "same slots, counts and totals; old failures are not counted again"
    );
    assert_eq!(second.datapath.services.get(&vip(0)), Some(&0));
}

#[test]
fn a_running_service_the_new_config_does_not_name_is_removed_its_flows_finishing() {
    let mut first = balancer(&[1]);
    first.datapath.set_active(0, 0, 2);
    let mut second = Balancer::new(first.datapath.clone());
    second.adopt();
    second.add_service(&service("api", vip(1), &[1])).unwrap();
    second.finish_adoption().unwrap();
    assert_eq!(second.datapath.services.get(&vip(0)), None);
    assert_eq!(second.datapath.services.get(&vip(1)), Some(&1), "a new id: 0 still holds counts");
    assert_eq!(second.model.retired, [0]);
}

#[test]
fn counts_are_checked_against_the_live_flows_in_the_table() {
    let mut b = balancer(&[1, 1]);
    let flow = |slot: u16, state: u32| Flow { service: 0, slot, state, direction: DIR_FORWARD, ..Flow::default() };
    let key = |port: u16| FlowKey { sport: port, ..FlowKey::default() };
    b.datapath.flows = vec![(key(1), flow(0, FLOW_ESTABLISHED)), (key(2), flow(0, 0))];
    b.datapath.set_active(0, 0, HALF_OPEN_ONE + 1);
    assert_eq!(b.verify_counts().unwrap(), (2, vec![]));
    let status = b.status().unwrap();
    let counts: Vec<(u64, u64)> =
        status.services[0].backends.iter().map(|b| (b.active_connections, b.half_open_connections)).collect();
    assert_eq!(counts, [(1, 1), (0, 0)], "established and half-open apart");
    b.datapath.set_active(0, 1, 3);
    let (_, differing) = b.verify_counts().unwrap();
    assert_eq!(differing, ["web 198.19.0.12:80: counts 3 established and 0 half-open but the table has 0 and 0"]);
}

#[test]
fn the_status_names_every_counter_and_flow_state() {
    let mut b = balancer(&[1]);
    b.datapath.counters[lb_common::Counter::TableFull as usize] = 5;
    let status = b.status().unwrap();
    assert_eq!(status.counters.len(), lb_common::COUNTER_COUNT);
    assert_eq!(status.counters["table_full"], 5);
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["services"][0]["backends"][0]["state"], "up");
    let flow = Flow { service: 0, slot: 0, direction: DIR_FORWARD, nat_addr: 1, ..Flow::default() };
    b.datapath.flows = vec![(FlowKey::default(), flow)];
    assert_eq!(serde_json::to_value(b.conntrack()).unwrap()[0]["state"], "syn_sent");
}

#[test]
fn a_dsr_service_is_written_with_its_tunnel_and_its_backends_neighbours_kept_resolved_once() {
    use crate::config::{Mode, Tunnel};
    let mut b = Balancer::new(FakeMaps::new(4));
    let mut config = service("web", vip(0), &[1, 1]);
    config.mode = Mode::Dsr;
    config.tunnel = Tunnel::Ipip;
    b.add_service(&config).unwrap();
    let value = b.datapath.service_values[&vip(0)];
    assert_eq!(value.flags, lb_common::SERVICE_DSR | lb_common::SERVICE_IPIP);
    // The tunnel's source: the host's address towards each backend.
    let set = b.datapath.backend_set(0).unwrap();
    assert!(set.slots[..2].iter().all(|s| s.snat_addr == crate::datapath::wire_addr(std::net::Ipv4Addr::new(198, 19, 0, 1))));
    assert_eq!(b.datapath.neighbours_kept, [*addr(1).ip(), *addr(2).ip()]);
    // A third backend: only it is asked for.
    b.add_backend("web", &BackendConfig::new(addr(3), 1)).unwrap();
    assert_eq!(b.datapath.neighbours_kept, [*addr(1).ip(), *addr(2).ip(), *addr(3).ip()]);
    // A backend on another port cannot take DSR's packets: refused, nothing written.
    let writes = b.datapath.writes;
    let err = b.add_backend("web", &BackendConfig::new(std::net::SocketAddrV4::new(*addr(4).ip(), 8080), 1)).unwrap_err();
    assert!(format!("{err:#}").contains("port 80"), "{err:#}");
    assert_eq!(b.datapath.writes, writes);
}
