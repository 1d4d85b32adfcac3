//! `random_two_least_conn`: least connections between two backends picked at
//! random, on crafted packets through BPF_PROG_TEST_RUN. It must still
//! balance by connections per weight, keep backups out while a primary can
//! serve, and respect caps and the backend a retried SYN avoids.
use lb::{
    api::Admin, reconcile::Balancer,
    config::{BackendConfig, Scheduler},
    datapath::XDP_DROP,
};
use lb_tests::{
    packet::{Tcp, SYN},
    routed::{active, backend, backend_index, client, open, run, with_balancer_scheduling, VIP},
};

fn random_two(weights: &[u32], test: impl FnOnce(&mut Balancer) + Send) {
    with_balancer_scheduling(weights, Scheduler::RandomTwoLeastConn, test)
}

#[test]
fn held_connections_spread_evenly_not_at_random() {
    random_two(&[1; 8], |b| {
        for port in 0..960 {
            open(b, 40000 + port);
        }
        let active = active(b);
        assert_eq!(active.iter().sum::<u64>(), 960);
        let mean = 960.0 / 8.0;
        let spread = (active.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / 8.0).sqrt();
        // A uniform random choice leaves a standard deviation of about 10
        // here; the better of two, at most about 2.7 in 100,000 simulated runs.
        assert!(spread <= 3.0, "connections per backend: {active:?}");
    });
}

#[test]
fn connections_follow_the_weights_even_past_the_chance_of_being_picked() {
    // Backend 0 should take 5/8 of the flows, more than the 1/2 chance a
    // uniform pick of two out of four would give it: the picks follow the
    // weights too.
    random_two(&[5, 1, 1, 1], |b| {
        for port in 0..320 {
            open(b, 41000 + port);
        }
        let active = active(b);
        // Within 6 of 200/40/40/40 in 40,000 simulated runs.
        assert!((192..=208).contains(&active[0]), "weights 5:1:1:1: {active:?}");
        for &a in &active[1..] {
            assert!((32..=48).contains(&a), "weights 5:1:1:1: {active:?}");
        }
    });
}

#[test]
fn backups_stay_out_while_a_primary_can_serve() {
    random_two(&[1, 1, 1], |b| {
        b.add_backend("web", &BackendConfig { backup: true, ..BackendConfig::new(backend(3), 1) }).unwrap();
        for port in 0..60 {
            assert_ne!(backend_index(open(b, 42000 + port)), 3, "a backup took a flow");
        }
        b.set_admin("web", backend(0), Admin::Disabled).unwrap();
        b.set_admin("web", backend(1), Admin::Disabled).unwrap();
        // One primary left: too few to pick two, so every flow goes to it.
        for port in 0..10 {
            assert_eq!(open(b, 42100 + port), backend(2));
        }
        b.set_admin("web", backend(2), Admin::Disabled).unwrap();
        assert_eq!(open(b, 42200), backend(3), "no primary can: the backup serves");
    });
}

#[test]
fn capped_backends_are_passed_over_even_when_both_picks_are_full() {
    random_two(&[], |b| {
        for i in 0..4 {
            let max_conns = if i == 3 { 0 } else { 1 };
            b.add_backend("web", &BackendConfig { max_conns, ..BackendConfig::new(backend(i), 1) }).unwrap();
        }
        // Three backends take one connection each; after that only backend 3
        // has room, though the two random picks often land on full ones.
        for port in 0..40 {
            open(b, 43000 + port);
        }
        assert_eq!(active(b), vec![1, 1, 1, 37]);
        b.set_admin("web", backend(3), Admin::Disabled).unwrap();
        let (verdict, _) = run(b, &Tcp::new(client(43100), VIP, SYN).frame());
        assert_eq!(verdict, XDP_DROP, "every backend is at its cap");
    });
}
