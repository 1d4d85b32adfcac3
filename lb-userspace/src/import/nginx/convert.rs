//! What an nginx configuration balances, as lb's services: each `upstream`
//! (or address) that a `stream` or `http` server's `proxy_pass` names, on
//! that server's `listen` address. Everything else is a warning with its
//! place, never dropped in silence.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4, ToSocketAddrs},
};

use super::syntax::{Directive, Place};
use crate::config::{BackendConfig, CheckKind, HealthConfig, Scheduler, ServiceConfig, MAX_WEIGHT};

/// What the command line adds to the configuration.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The VIP for `listen` directives that give only a port (or `*`).
    pub vip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone)]
pub struct Warning {
    pub at: Place,
    pub text: String,
}

#[derive(Debug, Default)]
pub struct Imported {
    pub services: Vec<ServiceConfig>,
    pub warnings: Vec<Warning>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Context {
    Http,
    Stream,
}

impl Context {
    fn name(self) -> &'static str {
        match self {
            Context::Http => "http",
            Context::Stream => "stream",
        }
    }
}

/// A server's choice of pool: where it listens and where it proxies.
struct Proxy<'a> {
    listens: Vec<&'a Directive>,
    target: &'a Directive,
    health: Option<&'a Directive>,
}

/// Converts a loaded configuration (`syntax::load`).
pub fn convert(tree: &[Directive], options: &Options) -> Imported {
    let mut out = Imported::default();
    let mut upstreams: Vec<(Context, &Directive)> = Vec::new();
    let mut servers: Vec<(Context, &Directive)> = Vec::new();
    for d in tree {
        let context = match d.name.as_str() {
            "http" => Context::Http,
            "stream" => Context::Stream,
            _ => {
                out.warn(d, format!("{}: a setting of nginx's own processes; lb needs none", d.name));
                continue;
            }
        };
        for inner in d.children() {
            match inner.name.as_str() {
                "upstream" => upstreams.push((context, inner)),
                "server" => servers.push((context, inner)),
                _ => out.warn(inner, format!("{} {}", context.name(), not_layer_4(&inner.name))),
            }
        }
    }

    // Each upstream converted once, however many servers use it.
    let mut converted: Vec<Option<(Scheduler, Vec<BackendConfig>)>> = vec![None; upstreams.len()];
    let mut names: HashMap<String, usize> = HashMap::new();
    for (context, server) in servers {
        let Some(proxy) = out.proxy_of(context, server) else { continue };
        let target = &proxy.target.args[0];
        let (host, default_port) = strip_scheme(target, context);
        if target.starts_with("https://") {
            out.warn(proxy.target, "proxy_pass https: nginx encrypts again towards the backends; lb forwards the client's bytes as they are".into());
        }
        if host.contains('$') {
            out.warn(proxy.target, format!("proxy_pass {target}: a variable is only known per request; not imported"));
            continue;
        }
        let found = upstreams.iter().position(|(c, u)| *c == context && u.args.first().map(String::as_str) == Some(host));
        let (pool_name, scheduler, backends) = match found {
            Some(i) => {
                if converted[i].is_none() {
                    converted[i] = Some(out.upstream(context, upstreams[i].1));
                }
                let (scheduler, backends) = converted[i].clone().expect("converted above");
                (host.to_string(), scheduler, backends)
            }
            None => match out.backend_address(proxy.target, host, default_port) {
                Some(addresses) => (
                    format!("{context}-{}", host.replace([':', '.'], "-"), context = context.name()),
                    Scheduler::LeastConn,
                    addresses.into_iter().map(|a| BackendConfig::new(a, 1)).collect(),
                ),
                None => continue,
            },
        };
        let health = proxy.health.map(|h| out.health_check(context, h));
        for listen in &proxy.listens {
            let Some(vip) = out.vip(listen, options) else { continue };
            if let Some(other) = out.services.iter().find(|s| s.vip == vip) {
                out.warn(listen, format!(
                    "listen {vip}: already the VIP of service {}; at layer 4 one address and port go to one pool \
                     (name-based virtual hosts cannot be told apart); not imported", other.name));
                continue;
            }
            let name = unique_name(&mut names, &pool_name, vip);
            out.services.push(ServiceConfig {
                name,
                vip,
                scheduler,
                mode: Default::default(),
                health: health.clone(),
                on_backend_down: Default::default(),
                snat_addresses: Vec::new(),
                snat_ports: crate::config::DEFAULT_SNAT_PORTS,
                tunnel: crate::config::Tunnel::None,
                backends: backends.clone(),
            });
        }
    }
    for (i, (context, upstream)) in upstreams.iter().enumerate() {
        if converted[i].is_none() {
            let name = upstream.args.first().map_or("", String::as_str);
            out.warn(upstream, format!("{} upstream {name}: no server proxies to it; not imported", context.name()));
        }
    }
    // In the order of the files and their lines.
    out.warnings.sort_by(|a, b| a.at.file.cmp(&b.at.file).then(a.at.line.cmp(&b.at.line)));
    out
}

impl Imported {
    fn warn(&mut self, at: &Directive, text: String) {
        self.warnings.push(Warning { at: at.at.clone(), text });
    }

    /// A server's listens and the pool it proxies to, warning about the rest.
    fn proxy_of<'a>(&mut self, context: Context, server: &'a Directive) -> Option<Proxy<'a>> {
        let mut listens = Vec::new();
        let mut targets: Vec<(String, &'a Directive)> = Vec::new();
        let mut health = None;
        for d in server.children() {
            match (context, d.name.as_str()) {
                (_, "listen") => listens.push(d),
                (Context::Stream, "proxy_pass") if d.args.len() == 1 => targets.push(("".into(), d)),
                (_, "health_check") => health = Some(d),
                (Context::Http, "location") => self.location(d, &mut targets, &mut health),
                (Context::Http, "server_name") => self.warn(d, format!(
                    "server_name {}: lb balances by address and port; every name on this server's listen goes to the same pool",
                    d.args.join(" "))),
                (_, name) => self.warn(d, format!("{} server: {}", context.name(), not_layer_4(name))),
            }
        }
        if listens.is_empty() && context == Context::Http {
            // nginx's default for an http server.
            listens.push(server);
        }
        // The pool of `location /`, or else of the first location that has one.
        let chosen = targets.iter().position(|(path, _)| path == "/").unwrap_or(0);
        let Some((_, target)) = targets.get(chosen).cloned() else {
            self.warn(server, format!("{} server: proxies to no upstream, so there is nothing to balance; not imported", context.name()));
            return None;
        };
        for (path, other) in &targets {
            if other.args != target.args {
                self.warn(other, format!(
                    "location {path} proxies to {}: at layer 4 one listen address goes to one pool ({}); not imported",
                    other.args[0], target.args[0]));
            }
        }
        Some(Proxy { listens, target, health })
    }

    /// The `proxy_pass` of a location and its nested ones.
    fn location<'a>(&mut self, location: &'a Directive, targets: &mut Vec<(String, &'a Directive)>, health: &mut Option<&'a Directive>) {
        let path = location.args.join(" ");
        for d in location.children() {
            match d.name.as_str() {
                "proxy_pass" if d.args.len() == 1 => targets.push((path.clone(), d)),
                "location" => self.location(d, targets, health),
                "health_check" => *health = Some(d),
                name => self.warn(d, format!("location {path}: {}", not_layer_4(name))),
            }
        }
    }

    /// An upstream's scheduler and servers.
    fn upstream(&mut self, context: Context, upstream: &Directive) -> (Scheduler, Vec<BackendConfig>) {
        let name = upstream.args.first().cloned().unwrap_or_default();
        let mut scheduler = None;
        let mut backends: Vec<BackendConfig> = Vec::new();
        for d in upstream.children() {
            match d.name.as_str() {
                "least_conn" => scheduler = Some(Scheduler::LeastConn),
                "random" => {
                    let two = d.args.first().map(String::as_str) == Some("two");
                    let method = d.args.get(1).map(String::as_str).unwrap_or("least_conn");
                    if !two || method != "least_conn" {
                        self.warn(d, format!(
                            "upstream {name}: random{}: imported as random_two_least_conn, the nearest lb has",
                            d.args.iter().map(|a| format!(" {a}")).collect::<String>()));
                    }
                    scheduler = Some(Scheduler::RandomTwoLeastConn);
                }
                "hash" | "ip_hash" | "sticky" => {
                    self.warn(d, format!(
                        "upstream {name}: {}: lb keeps no client affinity; each connection is balanced on its own \
                         (least_conn)", d.name));
                    scheduler = Some(Scheduler::LeastConn);
                }
                "least_time" => {
                    self.warn(d, format!("upstream {name}: least_time: imported as least_conn; lb measures no response times"));
                    scheduler = Some(Scheduler::LeastConn);
                }
                "server" => self.server(context, &name, d, &mut backends),
                "keepalive" | "keepalive_requests" | "keepalive_time" | "keepalive_timeout" => self.warn(d, format!(
                    "upstream {name}: {}: nginx's reuse of its own connections to the backends; through lb each client \
                     connection is its own backend connection", d.name)),
                "zone" => self.warn(d, format!("upstream {name}: zone: shared memory for nginx's workers; lb's counts are in the kernel")),
                other => self.warn(d, format!("upstream {name}: {other}: no layer-4 equivalent; not imported")),
            }
        }
        let scheduler = scheduler.unwrap_or_else(|| {
            self.warn(upstream, format!(
                "upstream {name}: round robin (nginx's default): imported as least_conn, which spreads equal \
                 backends the same way and also weighs long connections"));
            Scheduler::LeastConn
        });
        (scheduler, backends)
    }

    /// One upstream `server` line: a backend per address it names.
    fn server(&mut self, context: Context, upstream: &str, d: &Directive, backends: &mut Vec<BackendConfig>) {
        let Some(address) = d.args.first() else {
            return self.warn(d, format!("upstream {upstream}: server with no address; not imported"));
        };
        let default_port = match context {
            Context::Http => Some(80),
            Context::Stream => None,
        };
        let Some(addresses) = self.backend_address(d, address, default_port) else { return };
        let mut template = BackendConfig::new(addresses[0], 1);
        for param in &d.args[1..] {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let number = || value.parse::<u32>().ok();
            let parsed = match key {
                "weight" => number().filter(|w| (1..=MAX_WEIGHT).contains(w)).map(|w| template.weight = w),
                "max_fails" => number().map(|n| template.max_fails = n),
                "max_conns" => number().map(|n| template.max_conns = n),
                "fail_timeout" => nginx_time(value).map(|t| template.fail_timeout = t),
                "slow_start" => nginx_time(value).map(|t| template.slow_start = t),
                "backup" => Some(template.backup = true),
                "down" => {
                    self.warn(d, format!(
                        "upstream {upstream}: server {address} down: imported with weight 0 (no new connections; \
                         `lb backend weight` brings it back)"));
                    Some(())
                }
                _ => {
                    self.warn(d, format!("upstream {upstream}: server {address} {param}: no lb equivalent; ignored"));
                    Some(())
                }
            };
            if parsed.is_none() {
                self.warn(d, format!("upstream {upstream}: server {address} {param}: not a value nginx takes; ignored"));
            }
        }
        if d.args[1..].iter().any(|p| p == "down") {
            template.weight = 0;
        }
        for address in addresses {
            if let Some(same) = backends.iter_mut().find(|b| b.address == address) {
                // nginx takes a server listed twice as twice the weight.
                same.weight = (same.weight + template.weight).min(MAX_WEIGHT);
                self.warn(d, format!("upstream {upstream}: {address} is listed again: imported once, weights added"));
                continue;
            }
            backends.push(BackendConfig { address, ..template.clone() });
        }
    }

    /// The IPv4 addresses an upstream server or proxy_pass names (a name
    /// may resolve to several, each a backend, as nginx takes them).
    fn backend_address(&mut self, d: &Directive, address: &str, default_port: Option<u16>) -> Option<Vec<SocketAddrV4>> {
        if address.starts_with("unix:") {
            self.warn(d, format!("{address}: a local socket, not a network backend; not imported"));
            return None;
        }
        if address.starts_with('[') {
            self.warn(d, format!("{address}: IPv6; lb balances IPv4 only; not imported"));
            return None;
        }
        let (host, port) = match address.rsplit_once(':') {
            Some((host, port)) => match port.parse::<u16>() {
                Ok(p) if p != 0 => (host, p),
                _ => {
                    self.warn(d, format!("{address}: not a valid port; not imported"));
                    return None;
                }
            },
            None => match default_port {
                Some(p) => (address, p),
                None => {
                    self.warn(d, format!("{address}: no port (nginx needs one here too); not imported"));
                    return None;
                }
            },
        };
        if let Ok(ip) = host.parse::<Ipv4Addr>() {
            return Some(vec![SocketAddrV4::new(ip, port)]);
        }
        let resolved: Vec<SocketAddrV4> = match (host, port).to_socket_addrs() {
            Ok(found) => found
                .filter_map(|a| match a {
                    std::net::SocketAddr::V4(v4) => Some(v4),
                    _ => None,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        if resolved.is_empty() {
            self.warn(d, format!("{address}: the name does not resolve to an IPv4 address here; not imported"));
            return None;
        }
        self.warn(d, format!(
            "{address}: a name, resolved now to {}; lb keeps addresses, so run the import again when it changes",
            resolved.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")));
        Some(resolved)
    }

    /// The VIP of a `listen` (or of a server with none: nginx's `*:80`).
    fn vip(&mut self, listen: &Directive, options: &Options) -> Option<SocketAddrV4> {
        let (address, params) = match listen.name.as_str() {
            "listen" => match listen.args.split_first() {
                Some((a, p)) => (a.as_str(), p),
                None => return None,
            },
            _ => ("80", &[][..]),
        };
        for param in params {
            let name = param.split('=').next().unwrap_or(param);
            let text = match name {
                "udp" => {
                    self.warn(listen, format!("listen {address} udp: lb balances TCP only; not imported"));
                    return None;
                }
                "ssl" => "TLS is terminated by nginx here; lb forwards the encrypted bytes, so the backends must terminate TLS",
                "http2" | "quic" | "spdy" => "an HTTP protocol option; lb forwards the bytes whatever the protocol",
                "proxy_protocol" => "lb does not read a PROXY protocol header from clients",
                _ => "a listening-socket option; lb has no listening socket",
            };
            self.warn(listen, format!("listen {address} {param}: {text}"));
        }
        if address.starts_with('[') || address.starts_with("unix:") {
            self.warn(listen, format!("listen {address}: lb balances IPv4 TCP only; not imported"));
            return None;
        }
        let (host, port) = match address.rsplit_once(':') {
            Some((h, p)) => (Some(h), p),
            None if address.parse::<u16>().is_ok() => (None, address),
            // An address alone: nginx takes port 80.
            None => (Some(address), "80"),
        };
        let Ok(port) = port.parse::<u16>() else {
            self.warn(listen, format!("listen {address}: not a valid port; not imported"));
            return None;
        };
        let ip = match host {
            None | Some("*") | Some("0.0.0.0") => match options.vip {
                Some(vip) => vip,
                None => {
                    self.warn(listen, format!(
                        "listen {address}: every address of the host; give the VIP with --vip; not imported"));
                    return None;
                }
            },
            Some(h) => match h.parse::<Ipv4Addr>() {
                Ok(ip) => ip,
                Err(_) => {
                    self.warn(listen, format!("listen {address}: give the VIP as an IPv4 address; not imported"));
                    return None;
                }
            },
        };
        Some(SocketAddrV4::new(ip, port))
    }

    /// nginx Plus's `health_check` as the service's active checks.
    fn health_check(&mut self, context: Context, d: &Directive) -> HealthConfig {
        let mut health = HealthConfig {
            kind: if context == Context::Http { CheckKind::Http } else { CheckKind::Tcp },
            path: "/".into(),
            ..HealthConfig::default()
        };
        for param in &d.args {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let ok = match key {
                "interval" => nginx_time(value).map(|t| health.interval = t),
                "fails" => value.parse().ok().map(|n| health.fall = n),
                "passes" => value.parse().ok().map(|n| health.rise = n),
                "uri" => Some(health.path = value.to_string()),
                "port" => value.parse().ok().map(|p| health.port = Some(p)),
                _ => None,
            };
            if ok.is_none() {
                self.warn(d, format!("health_check {param}: no lb equivalent; ignored"));
            }
        }
        health
    }
}

/// The host (and port) of a proxy_pass target, and the port it implies.
fn strip_scheme(target: &str, context: Context) -> (&str, Option<u16>) {
    let (rest, port) = match (target.strip_prefix("http://"), target.strip_prefix("https://")) {
        (Some(rest), _) => (rest, Some(80)),
        (_, Some(rest)) => (rest, Some(443)),
        _ => (target, if context == Context::Http { Some(80) } else { None }),
    };
    (rest.split('/').next().unwrap_or(rest), port)
}

/// A service name from a pool's name, made unique: a pool that serves
/// several listens gets the VIP's port after the first.
fn unique_name(names: &mut HashMap<String, usize>, pool: &str, vip: SocketAddrV4) -> String {
    let base: String =
        pool.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' }).take(48).collect();
    for candidate in [base.clone(), format!("{base}-{}", vip.port())] {
        if !names.contains_key(&candidate) {
            names.insert(candidate.clone(), 1);
            return candidate;
        }
    }
    let seen = names.entry(base.clone()).or_insert(1);
    *seen += 1;
    format!("{base}-{}-{seen}", vip.port())
}

/// nginx's time syntax in seconds: `30s`, `1m30s`, `500ms`, a bare number
/// of seconds.
pub fn nginx_time(text: &str) -> Option<f64> {
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(seconds as f64);
    }
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" | "" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            "w" => 7.0 * 86_400.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    Some(total)
}

/// Why a directive of a server or a block above it is not imported.
fn not_layer_4(name: &str) -> String {
    let why = if name.starts_with("ssl") || name.starts_with("proxy_ssl") {
        "TLS; lb forwards the encrypted bytes, so the backends must terminate TLS"
    } else if name.ends_with("_header") || name.ends_with("_headers") || name == "proxy_hide_header" {
        "HTTP headers; lb does not look into HTTP"
    } else if ["rewrite", "return", "try_files", "root", "alias", "index", "error_page", "if", "set", "map", "autoindex"].contains(&name) {
        "HTTP request handling; lb does not look into HTTP"
    } else if name.contains("cache") || name.starts_with("gzip") || name.contains("buffer") {
        "caching, compression or buffering; lb forwards packets"
    } else if name.ends_with("_log") || name == "log_format" {
        "logging; lb counts per backend in its metrics and `lb stats`"
    } else if name.starts_with("limit_") {
        "rate and connection limits; lb's nearest are backends' max_conns"
    } else if name == "proxy_protocol" {
        "PROXY protocol towards the backends; lb does not send it yet"
    } else if name.ends_with("_timeout") {
        "a timeout; lb's idle timeouts are agent-wide ([agent.timeouts])"
    } else if name.starts_with("proxy_next_upstream") {
        "lb moves a refused or unanswered handshake to another backend by itself"
    } else if name == "resolver" {
        "lb keeps addresses; names are resolved once, at import"
    } else {
        "no layer-4 equivalent"
    };
    format!("{name}: {why}; not imported")
}
