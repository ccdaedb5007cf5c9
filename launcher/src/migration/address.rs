//! A job's own IP address moving between hosts with it (`vrun migrate --move-addr`), so that its peers keep
//! reaching it at the same address and, with `--tcp-established`, keep their very connections. The destination
//! takes the address before the job's sockets are made; the source lets go of it only once the job runs there,
//! and the destination then announces it with gratuitous ARP so the peers' caches point to it at once. Until
//! then the peers' segments reach the source, where the stopped job's sockets drop them (they are
//! retransmitted), never answered with a reset.

use anyhow::{Context, Result, anyhow, bail};
use std::net::Ipv4Addr;
use std::process::Command;

/// `IP/PREFIX`, IPv4.
#[derive(Clone, Debug)]
pub struct Address {
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Address, String> {
        let (ip, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let ip = ip.parse::<Ipv4Addr>().map_err(|_| format!("{s}: expected an IPv4 address, IP/PREFIX"))?;
        let prefix = prefix.parse::<u8>().ok().filter(|p| *p <= 32).ok_or_else(|| format!("{s}: bad prefix length"))?;
        Ok(Address { ip, prefix })
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// `serve --allow-addr`: an IPv4 network, `NET/PREFIX` with no host bits set, within which jobs arriving may
/// bring their own address.
#[derive(Clone, Debug)]
pub struct Range {
    pub net: Ipv4Addr,
    pub prefix: u8,
}

fn masked(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let m = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
    Ipv4Addr::from(u32::from(ip) & m)
}

impl std::str::FromStr for Range {
    type Err = String;
    fn from_str(s: &str) -> Result<Range, String> {
        let (ip, prefix) = s.split_once('/').ok_or_else(|| format!("{s}: expected an IPv4 network, NET/PREFIX (such as 10.0.0.0/24)"))?;
        let ip = ip.parse::<Ipv4Addr>().map_err(|_| format!("{s}: expected an IPv4 network, NET/PREFIX"))?;
        let prefix = prefix.parse::<u8>().ok().filter(|p| *p <= 32).ok_or_else(|| format!("{s}: bad prefix length"))?;
        let net = masked(ip, prefix);
        if net != ip {
            return Err(format!("{s}: host bits set (did you mean {net}/{prefix}?)"));
        }
        Ok(Range { net, prefix })
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl Range {
    /// `a` with its whole subnet lies inside this range (a wider prefix would give the host routes beyond it).
    pub fn holds(&self, a: &Address) -> bool {
        a.prefix >= self.prefix && masked(a.ip, self.prefix) == self.net
    }
}

/// Whether a job arriving here may take `a`: an ordinary unicast address inside one of `allowed`.
pub fn allowed(a: &Address, allowed: &[Range]) -> Result<(), String> {
    let ip = a.ip;
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() || ip.is_link_local() {
        return Err(format!("{a} is not an address a job can take"));
    }
    if a.prefix < 31 && (ip == masked(ip, a.prefix) || u32::from(ip) | (u32::MAX >> a.prefix) == u32::from(ip)) {
        return Err(format!("{a} is its subnet's network or broadcast address"));
    }
    if allowed.is_empty() {
        return Err(format!("this host takes no job's address ({a}): start its vrun serve with --allow-addr NET/PREFIX"));
    }
    if !allowed.iter().any(|r| r.holds(a)) {
        let list: Vec<String> = allowed.iter().map(|r| r.to_string()).collect();
        return Err(format!("{a} is outside the addresses this host lets jobs take (--allow-addr {})", list.join(", ")));
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<String> {
    let o = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !o.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The interface holding `a` here, if any.
pub fn holder(a: &Address) -> Result<Option<String>> {
    let out = ip(&["-o", "-4", "addr", "show", "to", &format!("{}/32", a.ip)])?;
    Ok(out.split_whitespace().nth(1).map(|d| d.trim_end_matches(':').to_string()))
}

/// Let go of `a` (the job left this host).
pub fn release(a: &Address) -> Result<()> {
    let dev = holder(a)?.ok_or_else(|| anyhow!("this host does not hold {a}"))?;
    ip(&["addr", "del", &a.to_string(), "dev", &dev]).map(|_| ())
}

/// An address this host took for a job that arrives: given back when dropped, unless the job runs here (`keep`).
pub struct Taken {
    pub addr: Address,
    pub dev: String,
    kept: bool,
}

impl Taken {
    pub fn keep(&mut self) {
        self.kept = true;
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if !self.kept {
            let _ = ip(&["addr", "del", &self.addr.to_string(), "dev", &self.dev]);
        }
    }
}

/// Take `a` on the interface that reaches its subnet. Nothing is announced yet.
pub fn take(a: Address) -> Result<Taken> {
    if let Some(dev) = holder(&a)? {
        bail!("{a} is already on {dev} here");
    }
    let route = ip(&["-o", "route", "get", &a.ip.to_string()])?;
    let dev = route.split_whitespace().skip_while(|w| *w != "dev").nth(1).ok_or_else(|| anyhow!("no route to {a} here: no interface to put it on"))?;
    ip(&["addr", "add", &a.to_string(), "dev", dev])?;
    Ok(Taken { addr: a, dev: dev.to_string(), kept: false })
}

/// Gratuitous ARP for `a` on `dev`: every host on the link now sends `a`'s traffic here.
pub fn announce(a: &Address, dev: &str) -> Result<()> {
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{dev}/address")).with_context(|| format!("the MAC address of {dev}"))?;
    let mut mac = [0u8; 6];
    for (m, h) in mac.iter_mut().zip(mac_text.trim().split(':')) {
        *m = u8::from_str_radix(h, 16).map_err(|_| anyhow!("{dev}: odd MAC address {mac_text}"))?;
    }
    let ifindex: i32 = std::fs::read_to_string(format!("/sys/class/net/{dev}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| anyhow!("{dev}: no interface index"))?;
    // An ARP request for our own address (RFC 5227 announcement): hardware Ethernet, protocol IPv4.
    let mut arp = Vec::with_capacity(28);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&a.ip.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&a.ip.octets());
    // SAFETY: socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, (libc::ETH_P_ARP as u16).to_be() as i32) };
    if fd < 0 {
        bail!("an ARP socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and ours.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
    to.sll_ifindex = ifindex;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: sending our buffer to a valid sockaddr_ll of its own size.
    let r = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            arp.as_ptr() as *const libc::c_void,
            arp.len(),
            0,
            &to as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        bail!("sending gratuitous ARP on {dev}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
