//! A namespace routed like a balancer host, for running the program through
//! BPF_PROG_TEST_RUN: the client network 198.18.0.0/24 on `cli`, the backends'
//! 198.19.0.0/16 on `srv`, forwarding on, and permanent neighbours, so the
//! program's route lookup succeeds and rewritten packets are redirected.
use std::net::{Ipv4Addr, SocketAddrV4};

use lb::{
    config::{BackendConfig, Mode, Scheduler, ServiceConfig},
    datapath::{Datapath, Maps},
    reconcile::Balancer,
};

use crate::{
    netns::Netns,
    packet::{inspect, Tcp, ACK, BACKEND_ISN, CLIENT_ISN, FIN, SYN},
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
    balancer.add_service(&service(weights, scheduler)).unwrap();
    balancer
}

/// The same service in full NAT, with source ports `snat_ports` and the
/// default source address (this host's on the backends' network:
/// `BALANCER`).
pub fn balancer_full_nat(weights: &[u32], max_flows: u32, snat_ports: [u16; 2]) -> Balancer {
    let mut balancer = Balancer::new(Datapath::load(max_flows).expect("load the XDP program"));
    let service = ServiceConfig { mode: Mode::FullNat, snat_ports, ..service(weights, Scheduler::LeastConn) };
    balancer.add_service(&service).unwrap();
    balancer
}

/// The same service in DSR (`tunnel`), its backends on the VIP's port.
pub fn balancer_dsr(weights: &[u32], tunnel: lb::config::Tunnel) -> Balancer {
    let mut balancer = Balancer::new(Datapath::load(1024).expect("load the XDP program"));
    let mut service = ServiceConfig { mode: Mode::Dsr, tunnel, ..service(weights, Scheduler::LeastConn) };
    for b in &mut service.backends {
        b.address.set_port(VIP.port());
    }
    balancer.add_service(&service).unwrap();
    balancer
}

/// The routed host's address on the backends' network.
pub const BALANCER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);

fn service(weights: &[u32], scheduler: Scheduler) -> ServiceConfig {
    ServiceConfig {
        name: "web".into(),
        vip: VIP,
        scheduler,
        mode: Mode::Nat,
        health: None,
        on_backend_down: Default::default(),
        snat_addresses: Vec::new(),
        snat_ports: lb::config::DEFAULT_SNAT_PORTS,
        tunnel: lb::config::Tunnel::None,
        backends: weights.iter().enumerate().map(|(i, &weight)| BackendConfig::new(backend(i), weight)).collect(),
    }
}

/// Another nat service, `name` at `vip`, least connections over `backends`
/// (weight 1 each): for tests of services that share a backend, or fill
/// the service slots.
pub fn another_service(name: &str, vip: SocketAddrV4, backends: &[SocketAddrV4]) -> ServiceConfig {
    let backends = backends.iter().map(|&address| BackendConfig::new(address, 1)).collect();
    ServiceConfig { name: name.into(), vip, backends, ..service(&[], Scheduler::LeastConn) }
}

pub fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, port)
}

/// A routed namespace and a fresh program serving VIP over backends with
/// `weights`, for one test.
pub fn with_balancer<T: Send>(weights: &[u32], test: impl FnOnce(&mut Balancer) -> T + Send) -> T {
    with_balancer_scheduling(weights, Scheduler::LeastConn, test)
}

/// `with_balancer` with a connection table of `max_flows` flows.
pub fn with_table<T: Send>(weights: &[u32], max_flows: u32, test: impl FnOnce(&mut Balancer) -> T + Send) -> T {
    let _serial = serial();
    let ns = routed_host(weights.len().max(4));
    let weights = weights.to_vec();
    ns.run(move || test(&mut balancer_scheduling(&weights, max_flows, Scheduler::LeastConn)))
}

/// A routed namespace and a fresh program serving VIP in full NAT over
/// backends with `weights`, from the balancer's source ports `ports`, for
/// one test.
pub fn with_full_nat<T: Send>(weights: &[u32], ports: [u16; 2], test: impl FnOnce(&mut Balancer) -> T + Send) -> T {
    let _serial = serial();
    let ns = routed_host(4);
    let weights = weights.to_vec();
    ns.run(move || test(&mut balancer_full_nat(&weights, 1024, ports)))
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

/// Keeps the calling thread on `cpu` from now on: the program keeps some
/// state per CPU (each CPU's ring of the flows it opened), which a test
/// following it must not see change under it.
pub fn on_cpu(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let pinned = libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
        assert_eq!(pinned, 0, "sched_setaffinity to CPU {cpu}: {}", std::io::Error::last_os_error());
    }
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

/// Sends the client's SYN and returns the backend it was sent to: the flow
/// is half-open.
pub fn syn(b: &Balancer, port: u16) -> SocketAddrV4 {
    let (verdict, out) = run(b, &Tcp::new(client(port), VIP, SYN).frame());
    assert_eq!(verdict, XDP_REDIRECT, "the SYN is forwarded");
    inspect(&out).dst
}

/// The rest of the handshake of a flow whose SYN went to `backend`: its
/// SYN-ACK, and the client's ACK. The flow is established.
pub fn complete(b: &Balancer, port: u16, backend: SocketAddrV4) {
    let syn_ack = Tcp::new(backend, client(port), SYN | ACK).seq(BACKEND_ISN).ack(CLIENT_ISN + 1);
    assert_eq!(run(b, &syn_ack.frame()).0, XDP_REDIRECT, "the SYN-ACK is forwarded");
    let ack = Tcp::new(client(port), VIP, ACK).seq(CLIENT_ISN + 1).ack(BACKEND_ISN + 1);
    assert_eq!(run(b, &ack.frame()).0, XDP_REDIRECT, "the handshake's ACK is forwarded");
}

/// A whole handshake from the client's `port`: returns the backend chosen.
pub fn open(b: &Balancer, port: u16) -> SocketAddrV4 {
    let backend = syn(b, port);
    complete(b, port, backend);
    backend
}

/// A segment from the client on an established flow from `port`: its
/// sequence and acknowledgment numbers are where the handshake left them.
pub fn from_client(port: u16, flags: u8) -> Tcp {
    Tcp::new(client(port), VIP, flags).seq(CLIENT_ISN + 1).ack(BACKEND_ISN + 1)
}

/// A segment from `backend` on an established flow to the client's `port`.
pub fn from_backend(backend: SocketAddrV4, port: u16, flags: u8) -> Tcp {
    Tcp::new(backend, client(port), flags).seq(BACKEND_ISN + 1).ack(CLIENT_ISN + 1)
}

/// Half-open connections per backend of service `web`.
pub fn half_open(b: &Balancer) -> Vec<u64> {
    b.status().unwrap().services[0].backends.iter().map(|b| b.half_open_connections).collect()
}

/// Both ends of one connection through the balancer, with sequence numbers
/// that follow what each side has sent: for tests that play a connection
/// (or an impostor) segment by segment.
#[derive(Clone, Debug)]
pub struct Conn {
    pub port: u16,
    pub backend: SocketAddrV4,
    /// Each side's next sequence number.
    pub client_seq: u32,
    pub backend_seq: u32,
}

impl Conn {
    /// The client's SYN with `isn`; the backend is where it went.
    pub fn syn(b: &Balancer, port: u16, isn: u32) -> (u32, Option<Self>) {
        let (verdict, out) = run(b, &Tcp::new(client(port), VIP, SYN).seq(isn).frame());
        let conn = (verdict == XDP_REDIRECT).then(|| Self {
            port,
            backend: inspect(&out).dst,
            client_seq: isn.wrapping_add(1),
            backend_seq: 0,
        });
        (verdict, conn)
    }

    /// A whole handshake: client ISN `isn`, the backend's `backend_isn`.
    pub fn open(b: &Balancer, port: u16, isn: u32, backend_isn: u32) -> Self {
        let (verdict, conn) = Self::syn(b, port, isn);
        assert_eq!(verdict, XDP_REDIRECT, "SYN from port {port}");
        let mut conn = conn.unwrap();
        conn.answer(b, backend_isn);
        let (verdict, _) = conn.send_client(b, ACK, b"");
        assert_eq!(verdict, XDP_REDIRECT, "the handshake's ACK from port {port}");
        conn
    }

    /// The backend's SYN-ACK with `backend_isn`.
    pub fn answer(&mut self, b: &Balancer, backend_isn: u32) {
        let syn_ack = Tcp::new(self.backend, client(self.port), SYN | ACK).seq(backend_isn).ack(self.client_seq);
        assert_eq!(run(b, &syn_ack.frame()).0, XDP_REDIRECT, "SYN-ACK to port {}", self.port);
        self.backend_seq = backend_isn.wrapping_add(1);
    }

    /// The client's next segment, as its stack would number it.
    pub fn client_segment(&self, flags: u8, payload: &[u8]) -> Tcp {
        Tcp::new(client(self.port), VIP, flags).seq(self.client_seq).ack(self.backend_seq).payload(payload)
    }

    /// The backend's next segment.
    pub fn backend_segment(&self, flags: u8, payload: &[u8]) -> Tcp {
        Tcp::new(self.backend, client(self.port), flags).seq(self.backend_seq).ack(self.client_seq).payload(payload)
    }

    /// Sends the client's next segment; returns the verdict and what left.
    pub fn send_client(&mut self, b: &Balancer, flags: u8, payload: &[u8]) -> (u32, Vec<u8>) {
        let sent = run(b, &self.client_segment(flags, payload).frame());
        self.client_seq = self.client_seq.wrapping_add(payload.len() as u32 + (flags & FIN != 0) as u32);
        sent
    }

    /// Sends the backend's next segment.
    pub fn send_backend(&mut self, b: &Balancer, flags: u8, payload: &[u8]) -> (u32, Vec<u8>) {
        let sent = run(b, &self.backend_segment(flags, payload).frame());
        self.backend_seq = self.backend_seq.wrapping_add(payload.len() as u32 + (flags & FIN != 0) as u32);
        sent
    }

    /// FIN both ways and the last ACK.
    pub fn close(&mut self, b: &Balancer) {
        for (verdict, who) in [
            (self.send_client(b, FIN | ACK, b"").0, "client FIN"),
            (self.send_backend(b, FIN | ACK, b"").0, "backend FIN"),
            (self.send_client(b, ACK, b"").0, "last ACK"),
        ] {
            assert_eq!(verdict, XDP_REDIRECT, "{who} of port {}", self.port);
        }
    }
}
