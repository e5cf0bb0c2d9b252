//! Hosts made of Linux network namespaces, for tests of the mesh on separate machines with a
//! broken network. Each host is a namespace with its own loopback and one `eth0` on a private
//! subnet (10.77.0.0/24), plugged into a bridge that lives in a namespace of its own (the
//! switch), so deleting the namespaces removes every link. Faults come from the real kernel:
//! nftables rules inside a host drop a share of its packets, or all of them (a partition).
//!
//! Processes run inside a host through `ip netns exec` ([`super::NodeProc::start_in`]). The test
//! itself stays in its own namespace and reaches into a host with sockets created there: a
//! socket keeps the namespace it was made in, so a short-lived thread that enters the host's
//! namespace makes the socket and hands it back ([`Net::listen`], [`Net::connect`]).
//!
//! Needs root, `ip` and `nft`. Under `CI=true` a missing one is a failure; elsewhere the test
//! says it skipped. Namespaces are named after the test process, so a run that died leaves
//! names the next run recognises (its process is gone) and removes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::require_tool;

const PREFIX: &str = "qmt";

/// Hosts joined by one switch; removed on drop.
pub struct Net {
    id: String,
    hosts: Vec<String>,
}

/// An nftables table inside a host; the fault lasts until this is dropped (or [`Fault::heal`]).
pub struct Fault {
    ns: String,
    table: String,
    healed: bool,
}

impl Fault {
    pub fn heal(mut self) {
        self.remove();
    }

    fn remove(&mut self) {
        if !self.healed {
            self.healed = true;
            let _ = run_quiet("ip", &["netns", "exec", &self.ns, "nft", "delete", "table", "inet", &self.table]);
        }
    }
}

impl Drop for Fault {
    fn drop(&mut self) {
        self.remove();
    }
}

/// `program` run inside network namespace `ns`: `ip netns exec` enters it and execs the
/// program, so the child's pid is the program's own.
pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn run_quiet(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Runs `f` on a fresh thread that has entered namespace `ns` (only that thread moves).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let handle = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with a descriptor that stays open meanwhile.
        let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

impl Net {
    /// Creates one namespace per host name, in order at 10.77.0.2, .3, ... None (after saying
    /// so) where root, `ip` or `nft` is missing outside CI; under CI=true that fails the test.
    pub fn new(hosts: &[&str]) -> Option<Net> {
        if unsafe { libc::geteuid() } != 0 {
            assert!(!under_ci(), "CI=true: the network-namespace tests need root");
            eprintln!("SKIPPED: network namespaces need root (CI=true makes this a failure)");
            return None;
        }
        if !require_tool("ip") || !require_tool("nft") {
            return None;
        }
        sweep_stale();
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let id = format!("{PREFIX}{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let net = Net { id, hosts: hosts.iter().map(|h| h.to_string()).collect() };
        let sw = net.switch();
        run("ip", &["netns", "add", &sw]);
        run("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge", "forward_delay", "0"]);
        run("ip", &["-n", &sw, "link", "set", "br0", "up"]);
        for (i, host) in hosts.iter().enumerate() {
            let ns = net.ns(host);
            let port = format!("p{i}");
            run("ip", &["netns", "add", &ns]);
            run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            run("ip", &["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            run("ip", &["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            run("ip", &["-n", &ns, "addr", "add", &format!("{}/24", net.ip(host)), "dev", "eth0"]);
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        }
        Some(net)
    }

    /// Gives `host`'s link a second address on the subnet (the first step of an address change).
    #[allow(dead_code)]
    pub fn add_addr(&self, host: &str, ip: IpAddr) {
        let ns = self.ns(host);
        // Linux removes a subnet's secondary addresses with its primary unless told to promote
        // one: the new address must outlive the old.
        run("ip", &["netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"]);
        run("ip", &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    }

    /// Takes `ip` away from `host`'s link: packets to it go nowhere, sockets bound to it fail.
    #[allow(dead_code)]
    pub fn del_addr(&self, host: &str, ip: IpAddr) {
        run("ip", &["-n", &self.ns(host), "addr", "del", &format!("{ip}/24"), "dev", "eth0"]);
    }

    /// Sets the MTU of every link (both ends of each veth and the bridge), for jumbo frames.
    #[allow(dead_code)]
    pub fn set_mtu(&self, mtu: u32) {
        let (sw, mtu) = (self.switch(), mtu.to_string());
        for (i, host) in self.hosts.iter().enumerate() {
            run("ip", &["-n", &sw, "link", "set", &format!("p{i}"), "mtu", &mtu]);
            run("ip", &["-n", &self.ns(host), "link", "set", "eth0", "mtu", &mtu]);
        }
        run("ip", &["-n", &sw, "link", "set", "br0", "mtu", &mtu]);
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.id)
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        assert!(self.hosts.iter().any(|h| h == host), "no host {host}");
        format!("{}-{host}", self.id)
    }

    /// The address of `host` on the shared subnet.
    pub fn ip(&self, host: &str) -> IpAddr {
        let i = self.hosts.iter().position(|h| h == host).unwrap_or_else(|| panic!("no host {host}"));
        IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2 + i as u8))
    }

    /// `host`'s address with `port`.
    pub fn addr(&self, host: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(host), port)
    }

    /// A TCP listener bound inside `host` (to its loopback or its subnet address).
    pub fn listen(&self, host: &str, addr: SocketAddr) -> tokio::net::TcpListener {
        let l = in_ns(&self.ns(host), move || std::net::TcpListener::bind(addr)).unwrap();
        l.set_nonblocking(true).unwrap();
        tokio::net::TcpListener::from_std(l).unwrap()
    }

    /// A TCP connection from inside `host` to `addr` (as seen from there).
    pub async fn connect(&self, host: &str, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let ns = self.ns(host);
        let fd = tokio::task::spawn_blocking(move || {
            in_ns(&ns, || {
                // SAFETY: a plain socket(2) call; the descriptor is owned by the TcpSocket below.
                let fd = unsafe {
                    libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
                };
                if fd < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(fd)
                }
            })
        })
        .await
        .unwrap()?;
        // SAFETY: `fd` is a fresh, non-blocking TCP socket nothing else owns.
        let socket = unsafe { tokio::net::TcpSocket::from_raw_fd(fd) };
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// An HTTP/1.1 GET from inside `host`: (status, body); status 0 with the error when it failed.
    pub async fn http_get(&self, host: &str, addr: SocketAddr, path: &str) -> (u16, String) {
        self.http_get_as(host, addr, path, &addr.to_string()).await
    }

    /// [`Net::http_get`] with `authority` as the Host header.
    pub async fn http_get_as(&self, host: &str, addr: SocketAddr, path: &str, authority: &str) -> (u16, String) {
        use http_body_util::BodyExt;
        let stream = match self.connect(host, addr).await {
            Ok(s) => s,
            Err(e) => return (0, e.to_string()),
        };
        let Ok((mut send, conn)) = hyper::client::conn::http1::handshake::<_, http_body_util::Empty<bytes::Bytes>>(
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        else {
            return (0, "handshake failed".into());
        };
        tokio::spawn(conn);
        let req = http::Request::get(path).header("host", authority).body(Default::default()).unwrap();
        match send.send_request(req).await {
            Ok(r) => {
                let status = r.status().as_u16();
                let body = r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
            Err(e) => (0, e.to_string()),
        }
    }

    /// Loads nftables `rules` (statements of one chain, one per line) into `host`, hooked on
    /// both input and output, until the returned fault is dropped.
    pub fn nft(&self, host: &str, rules: &str) -> Fault {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let table = format!("fault{}", SEQ.fetch_add(1, Ordering::Relaxed));
        let ns = self.ns(host);
        let mut script = format!("add table inet {table}\n");
        for hook in ["input", "output"] {
            script.push_str(&format!(
                "add chain inet {table} {hook} {{ type filter hook {hook} priority 0; policy accept; }}\n"
            ));
            for rule in rules.lines().map(str::trim).filter(|r| !r.is_empty()) {
                script.push_str(&format!("add rule inet {table} {hook} {rule}\n"));
            }
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "nft in {host}: {}\n{script}", String::from_utf8_lossy(&out.stderr));
        Fault { ns, table, healed: false }
    }

    /// Cuts `host` off the subnet: every packet through its `eth0` is dropped, both ways.
    pub fn partition(&self, host: &str) -> Fault {
        self.nft(host, "iifname \"eth0\" drop\noifname \"eth0\" drop")
    }

    /// Cuts the link between `host` and `other` only (both ways), from `host`'s side.
    pub fn cut(&self, host: &str, other: &str) -> Fault {
        let ip = self.ip(other);
        self.nft(host, &format!("ip saddr {ip} drop\nip daddr {ip} drop"))
    }

    /// Drops `percent`% of `host`'s UDP datagrams on `eth0`, at random, each way.
    pub fn udp_loss(&self, host: &str, percent: u32) -> Fault {
        self.nft(
            host,
            &format!(
                "iifname \"eth0\" meta l4proto udp numgen random mod 100 < {percent} drop\n\
                 oifname \"eth0\" meta l4proto udp numgen random mod 100 < {percent} drop"
            ),
        )
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = run_quiet("ip", &["netns", "del", &format!("{}-{host}", self.id)]);
        }
        let _ = run_quiet("ip", &["netns", "del", &self.switch()]);
    }
}

/// Removes namespaces of earlier test processes that are gone (a run killed mid-test).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run_quiet("ip", &["netns", "del", name]);
        }
    }
}
