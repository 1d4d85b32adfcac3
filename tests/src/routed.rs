//! A namespace routed like a balancer host, for running the program through
//! BPF_PROG_TEST_RUN: the client network 198.18.0.0/24 on `cli`, the backends'
//! 198.19.0.0/16 on `srv`, forwarding on, and permanent neighbours, so the
//! program's route lookup succeeds and rewritten packets are redirected.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb::{
    reconcile::Balancer,
    config::{BackendConfig, Mode, Scheduler, ServiceConfig},
    datapath::{Datapath, Maps},
};

use crate::{
    netns::Netns,
    packet::{inspect, Tcp, SYN},
    serial,
};
use lb::datapath::XDP_REDIRECT;
use lb_common::Counter;

pub const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 100), 80);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

pub fn backend(i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 19, (i / 200) as u8, 11 + (i % 200) as u8), 8080)
}

pub fn backend_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 1, (i >> 8) as u8, i as u8]
}

pub fn backend_index(addr: SocketAddrV4) -> usize {
    let o = addr.ip().octets();
    o[2] as usize * 200 + (o[3] - 11) as usize
}

/// The namespace, with neighbours for `backends` backends.
pub fn routed_host(backends: usize) -> Netns {
    let ns = Netns::new("routed");
    ns.exec(
        "ip link add cli type veth peer cli-peer && ip link add srv type veth peer srv-peer \
         && ip link set cli up && ip link set cli-peer up && ip link set srv up && ip link set srv-peer up \
         && ip addr add 198.18.0.1/24 dev cli && ip addr add 198.19.0.1/16 dev srv \
         && sysctl -qw net.ipv4.ip_forward=1",
    );
    let mut batch = format!("neigh add {CLIENT} lladdr 02:00:00:00:00:02 dev cli nud permanent\n");
    for i in 0..backends {
        let mac = backend_mac(i).map(|b| format!("{b:02x}")).join(":");
        batch.push_str(&format!("neigh add {} lladdr {mac} dev srv nud permanent\n", backend(i).ip()));
    }
    let file = std::env::temp_dir().join(format!("{}.neigh", ns.name));
    std::fs::write(&file, batch).unwrap();
    ns.exec(&format!("ip -batch {}", file.display()));
    let _ = std::fs::remove_file(file);
    ns
}

/// A freshly loaded program serving VIP over backends with `weights`.
pub fn balancer(weights: &[u32], max_flows: u32) -> Balancer {
    balancer_scheduling(weights, max_flows, Scheduler::LeastConn)
}

pub fn balancer_scheduling(weights: &[u32], max_flows: u32, scheduler: Scheduler) -> Balancer {
    let mut balancer = Balancer::new(Datapath::load(max_flows).expect("load the XDP program"));
    let service = ServiceConfig {
        name: "web".into(),
        vip: VIP,
        scheduler,
        mode: Mode::Nat,
        health: None,
        on_backend_down: Default::default(),
        backends: weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| BackendConfig::new(backend(i), weight))
            .collect(),
    };
    balancer.add_service(&service).unwrap();
    balancer
}

pub fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, port)
}

/// A routed namespace and a fresh program serving VIP over backends with
/// `weights`, for one test.
pub fn with_balancer<T: Send>(weights: &[u32], test: impl FnOnce(&mut Balancer) -> T + Send) -> T {
    with_balancer_scheduling(weights, Scheduler::LeastConn, test)
}

/// `with_balancer`, the service choosing backends by `scheduler`.
pub fn with_balancer_scheduling<T: Send>(
    weights: &[u32],
    scheduler: Scheduler,
    test: impl FnOnce(&mut Balancer) -> T + Send,
) -> T {
    let _serial = serial();
    let ns = routed_host(weights.len().max(4));
    let weights = weights.to_vec();
    ns.run(move || test(&mut balancer_scheduling(&weights, 1024, scheduler)))
}

/// The program's verdict on `frame`, and the frame it let out.
pub fn run(b: &Balancer, frame: &[u8]) -> (u32, Vec<u8>) {
    b.datapath.run_packet(frame).expect("BPF_PROG_TEST_RUN")
}

/// Active connections per backend of service `web`.
pub fn active(b: &Balancer) -> Vec<u64> {
    b.status().unwrap().services[0].backends.iter().map(|b| b.active_connections).collect()
}

pub fn counter(b: &Balancer, c: Counter) -> u64 {
    b.datapath.counters().unwrap()[c as usize]
}

pub fn flow_entries(b: &Balancer) -> usize {
    b.datapath.flows().len()
}

/// Sends the client's SYN and returns the backend it was sent to.
pub fn open(b: &Balancer, port: u16) -> SocketAddrV4 {
    let (verdict, out) = run(b, &Tcp::new(client(port), VIP, SYN).frame());
    assert_eq!(verdict, XDP_REDIRECT);
    inspect(&out).dst
}
