//! A backend server for the tests and the demo, as its own process:
//! `lb-echo ADDR NAME FLAG` greets every connection on ADDR with NAME and
//! echoes it; `GET /health` on the next port answers 200, or 503 while the
//! file FLAG exists. Runs until killed.
use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener},
    path::PathBuf,
    sync::atomic::AtomicBool,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(name), Some(flag)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: lb-echo ADDR NAME UNHEALTHY_FLAG_FILE");
        std::process::exit(2);
    };
    let addr: SocketAddrV4 = addr.parse().expect("ADDR is ip:port");
    let flag = PathBuf::from(flag);
    let health = TcpListener::bind(SocketAddrV4::new(*addr.ip(), addr.port() + 1)).expect("bind health port");
    std::thread::spawn(move || {
        for conn in health.incoming().flatten() {
            let mut conn = conn;
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let status = if flag.exists() { "503 Service Unavailable" } else { "200 OK" };
            let _ = write!(conn, "HTTP/1.0 {status}\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let listener = TcpListener::bind(addr).expect("bind");
    listener.set_nonblocking(true).unwrap();
    lb_tests::servers::serve(listener, &name, &AtomicBool::new(false));
}
