//! kube-proxy's rule sets for a [`ServiceSet`], written the way kube-proxy writes them, so the
//! iptables and nftables baselines walk the same rules a real node walks.
//!
//! * [`iptables_restore`]: iptables mode (kube-proxy 1.29+ layout, `pkg/proxy/iptables`):
//!   `PREROUTING`/`OUTPUT` -> `KUBE-SERVICES` (one rule per ClusterIP, then the
//!   `--dst-type LOCAL` jump to `KUBE-NODEPORTS` as its last rule) -> `KUBE-EXT-<hash>` (marks
//!   for masquerade) -> `KUBE-SVC-<hash>` (`-m statistic --mode random --probability 1/n`,
//!   `1/(n-1)`, ...) -> `KUBE-SEP-<hash>` (`-j DNAT`), `KUBE-MARK-MASQ` (mark 0x4000) and
//!   `KUBE-POSTROUTING` (`MASQUERADE --random-fully`), plus the filter table's
//!   `KUBE-FORWARD`/`KUBE-FIREWALL` chains. Chain names use kube-proxy's own hash
//!   (base32(sha256(servicePortName + protocol [+ endpoint]))[:16]), so they match a real
//!   node's byte for byte. Left out: the `-m nfacct` counters of the localhost NodePort and
//!   INVALID rules (they need nfacct objects; the rules are kept without the counter).
//! * [`nftables_script`]: nftables mode (`pkg/proxy/nftables`): table `ip kube-proxy`, the
//!   `service-ips` (daddr . proto . dport) and `service-nodeports` (proto . dport) verdict
//!   maps, per-Service `service-`/`external-` chains picking an endpoint with
//!   `numgen random mod n vmap`, per-endpoint `endpoint-` chains doing `dnat`.
//!
//! Both are pure text generators; `e2e.rs` applies them with `iptables-restore` / `nft -f`
//! inside the lab's node namespace.
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::services::{ServicePort, SERVICE_CIDR};

/// The node-level settings kube-proxy's rules depend on.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// `--cluster-cidr`: traffic from outside it to a ClusterIP is masqueraded.
    pub cluster_cidr: String,
    /// Addresses NodePorts answer on (nftables `nodeport-ips`).
    pub node_ips: Vec<Ipv4Addr>,
}

const MASQ_MARK: &str = "0x4000";

/// kube-proxy's `portProtoHash`-style name hash: base32(sha256(s)), first `len` chars.
pub fn name_hash(s: &str, len: usize) -> String {
    let digest = sha256(s.as_bytes());
    let mut enc = base32(&digest);
    enc.truncate(len);
    enc
}

fn svc_chain(p: &ServicePort) -> String {
    format!(
        "KUBE-SVC-{}",
        name_hash(&format!("{}{}", p.svc_port_name(), p.proto.lower()), 16)
    )
}

fn ext_chain(p: &ServicePort) -> String {
    format!(
        "KUBE-EXT-{}",
        name_hash(&format!("{}{}", p.svc_port_name(), p.proto.lower()), 16)
    )
}

fn sep_chain(p: &ServicePort, ep: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        name_hash(&format!("{}{}{ep}", p.svc_port_name(), p.proto.lower()), 16)
    )
}

/// `--comment` argument: quoted when it has spaces, as kube-proxy writes it.
fn comment(s: &str) -> String {
    if s.contains(' ') {
        format!("\"{s}\"")
    } else {
        s.to_owned()
    }
}

/// kube-proxy's probability formatting (`%0.10f` of 1/(n-i)).
fn probability(remaining: usize) -> String {
    format!("{:.10}", 1.0 / remaining as f64)
}

/// The complete `iptables-restore` input (filter and nat tables) for `ports`, Services in
/// list order in `KUBE-SERVICES` and `KUBE-NODEPORTS`.
pub fn iptables_restore(ports: &[ServicePort], cfg: &NodeConfig) -> String {
    let mut f = String::new();
    // ---- filter ----
    f.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for c in [
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FIREWALL",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SERVICES",
    ] {
        let _ = writeln!(f, ":{c} - [0:0]");
    }
    f.push_str(concat!(
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n",
        "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A INPUT -j KUBE-FIREWALL\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A OUTPUT -j KUBE-FIREWALL\n",
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        "COMMIT\n",
    ));

    // ---- nat ----
    f.push_str(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    for c in [
        "KUBE-MARK-MASQ",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-SERVICES",
    ] {
        let _ = writeln!(f, ":{c} - [0:0]");
    }
    for p in ports.iter().filter(|p| !p.endpoints.is_empty()) {
        let _ = writeln!(f, ":{} - [0:0]", svc_chain(p));
        if p.node_port.is_some() {
            let _ = writeln!(f, ":{} - [0:0]", ext_chain(p));
        }
        for ep in &p.endpoints {
            let _ = writeln!(f, ":{} - [0:0]", sep_chain(p, &ep.to_string()));
        }
    }
    f.push_str(concat!(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
    ));
    // KUBE-NODEPORTS, in Service order.
    for p in ports.iter().filter(|p| !p.endpoints.is_empty()) {
        let Some(np) = p.node_port else { continue };
        let (name, proto, ext) = (p.svc_port_name(), p.proto.lower(), ext_chain(p));
        let _ = writeln!(
            f,
            "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} -d 127.0.0.0/8 --dport {np} -j {ext}"
        );
        let _ = writeln!(
            f,
            "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {np} -j {ext}"
        );
    }
    // KUBE-SERVICES: one rule per ClusterIP, in Service order, then the NodePort jump last.
    for p in ports.iter().filter(|p| !p.endpoints.is_empty()) {
        let proto = p.proto.lower();
        let _ = writeln!(
            f,
            "-A KUBE-SERVICES -m comment --comment {} -m {proto} -p {proto} -d {} --dport {} -j {}",
            comment(&format!("{} cluster IP", p.svc_port_name())),
            p.cluster_ip,
            p.port,
            svc_chain(p)
        );
    }
    f.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    for p in ports.iter().filter(|p| !p.endpoints.is_empty()) {
        if p.node_port.is_none() {
            continue;
        }
        let ext = ext_chain(p);
        let _ = writeln!(
            f,
            "-A {ext} -m comment --comment {} -j KUBE-MARK-MASQ",
            comment(&format!(
                "masquerade traffic for {} external destinations",
                p.svc_port_name()
            ))
        );
        let _ = writeln!(f, "-A {ext} -j {}", svc_chain(p));
    }
    let _ = writeln!(f, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    let _ = writeln!(
        f,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(f, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    f.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    for p in ports.iter().filter(|p| !p.endpoints.is_empty()) {
        let (name, proto) = (p.svc_port_name(), p.proto.lower());
        for ep in &p.endpoints {
            let sep = sep_chain(p, &ep.to_string());
            let _ = writeln!(
                f,
                "-A {sep} -m comment --comment {name} -s {} -j KUBE-MARK-MASQ",
                ep.ip()
            );
            let _ = writeln!(
                f,
                "-A {sep} -m comment --comment {name} -m {proto} -p {proto} -j DNAT --to-destination {ep}"
            );
        }
        let svc = svc_chain(p);
        let _ = writeln!(
            f,
            "-A {svc} -m comment --comment {} -m {proto} -p {proto} -d {} --dport {} ! -s {} -j KUBE-MARK-MASQ",
            comment(&format!("{name} cluster IP")),
            p.cluster_ip,
            p.port,
            cfg.cluster_cidr
        );
        let n = p.endpoints.len();
        for (i, ep) in p.endpoints.iter().enumerate() {
            let sep = sep_chain(p, &ep.to_string());
            let c = comment(&format!("{name} -> {ep}"));
            if i + 1 < n {
                let _ = writeln!(
                    f,
                    "-A {svc} -m comment --comment {c} -m statistic --mode random --probability {} -j {sep}",
                    probability(n - i)
                );
            } else {
                let _ = writeln!(f, "-A {svc} -m comment --comment {c} -j {sep}");
            }
        }
    }
    f.push_str("COMMIT\n");
    f
}

/// nftables chain-name base: `hash8-namespace/name/proto/port` (kube-proxy's
/// `hashAndTruncate(servicePortChainNameBase)`).
fn nft_base(p: &ServicePort) -> String {
    let base = format!(
        "{}/{}/{}/{}",
        p.namespace,
        p.name,
        p.proto.lower(),
        p.port_name
    );
    format!("{}-{base}", name_hash(&base, 8))
}

fn nft_ep_base(p: &ServicePort, ep: &str) -> String {
    let base = format!(
        "{}/{}/{}/{}__{}",
        p.namespace,
        p.name,
        p.proto.lower(),
        p.port_name,
        ep.replace(':', "/")
    );
    format!("{}-{base}", name_hash(&base, 8))
}

/// The `nft -f` script for `ports`: kube-proxy's nftables-mode table `ip kube-proxy`.
pub fn nftables_script(ports: &[ServicePort], cfg: &NodeConfig) -> String {
    let t = "ip kube-proxy";
    let mut f = String::new();
    let _ = writeln!(f, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    let _ = writeln!(f, "flush table {t}");
    let _ = writeln!(
        f,
        "add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(f, "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}");
    let _ = writeln!(f, "add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}");
    let _ = writeln!(f, "add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}");
    let _ = writeln!(f, "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}");
    let _ = writeln!(f, "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}");
    let _ = writeln!(f, "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}");
    for c in [
        "cluster-ips-check",
        "filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }",
        "filter-output-pre-dnat { type filter hook output priority -110 ; }",
        "filter-forward { type filter hook forward priority 0 ; }",
        "filter-input { type filter hook input priority 0 ; }",
        "filter-output { type filter hook output priority 0 ; }",
        "firewall-check",
        "mark-for-masquerade",
        "masquerading",
        "nat-output { type nat hook output priority -100 ; }",
        "nat-postrouting { type nat hook postrouting priority 100 ; }",
        "nat-prerouting { type nat hook prerouting priority -100 ; }",
        "nodeport-endpoints-check",
        "reject-chain { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }",
        "services",
        "service-endpoints-check",
    ] {
        let _ = writeln!(f, "add chain {t} {c}");
    }
    for r in [
        "cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"".to_owned(),
        format!("cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\""),
        "filter-prerouting-pre-dnat ct state new jump firewall-check".into(),
        "filter-forward ct state new jump service-endpoints-check".into(),
        "filter-forward ct state new jump cluster-ips-check".into(),
        "filter-input ct state new jump nodeport-endpoints-check".into(),
        "filter-input ct state new jump service-endpoints-check".into(),
        "filter-output ct state new jump service-endpoints-check".into(),
        "filter-output-pre-dnat ct state new jump firewall-check".into(),
        "filter-output ct state new jump cluster-ips-check".into(),
        "firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips".into(),
        format!("mark-for-masquerade mark set mark or {MASQ_MARK}"),
        format!("masquerading mark and {MASQ_MARK} == 0 return"),
        format!("masquerading mark set mark xor {MASQ_MARK}"),
        "masquerading masquerade fully-random".into(),
        "nat-output jump services".into(),
        "nat-postrouting jump masquerading".into(),
        "nat-prerouting jump services".into(),
        "nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports".into(),
        "reject-chain reject".into(),
        "services ip daddr . meta l4proto . th dport vmap @service-ips".into(),
        "services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports".into(),
        "service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services".into(),
    ] {
        let _ = writeln!(f, "add rule {t} {r}");
    }
    for ip in &cfg.node_ips {
        let _ = writeln!(f, "add element {t} nodeport-ips {{ {ip} }}");
    }
    for p in ports.iter().filter(|p| !p.endpoints.is_empty()) {
        let proto = p.proto.lower();
        let base = nft_base(p);
        let svc = format!("service-{base}");
        let ext = format!("external-{base}");
        let eps: Vec<String> = p
            .endpoints
            .iter()
            .map(|ep| format!("endpoint-{}", nft_ep_base(p, &ep.to_string())))
            .collect();
        // A rule may only name chains that already exist: declare this Service's chains
        // first (kube-proxy's transactions add every chain before the rules too).
        let _ = writeln!(f, "add chain {t} {svc}");
        if p.node_port.is_some() {
            let _ = writeln!(f, "add chain {t} {ext}");
        }
        for chain in &eps {
            let _ = writeln!(f, "add chain {t} {chain}");
        }
        let _ = writeln!(
            f,
            "add rule {t} {svc} ip daddr {} ip saddr != {} jump mark-for-masquerade",
            p.cluster_ip, cfg.cluster_cidr
        );
        let vmap: Vec<String> = eps
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{i} : goto {c}"))
            .collect();
        let _ = writeln!(
            f,
            "add rule {t} {svc} numgen random mod {} vmap {{ {} }}",
            eps.len(),
            vmap.join(" , ")
        );
        if p.node_port.is_some() {
            let _ = writeln!(f, "add rule {t} {ext} jump mark-for-masquerade");
            let _ = writeln!(f, "add rule {t} {ext} goto {svc}");
        }
        for (ep, chain) in p.endpoints.iter().zip(&eps) {
            let _ = writeln!(
                f,
                "add rule {t} {chain} ip saddr {} jump mark-for-masquerade",
                ep.ip()
            );
            let _ = writeln!(f, "add rule {t} {chain} meta l4proto {proto} dnat to {ep}");
        }
        let _ = writeln!(f, "add element {t} cluster-ips {{ {} }}", p.cluster_ip);
        let _ = writeln!(
            f,
            "add element {t} service-ips {{ {} . {proto} . {} : goto {svc} }}",
            p.cluster_ip, p.port
        );
        if let Some(np) = p.node_port {
            let _ = writeln!(
                f,
                "add element {t} service-nodeports {{ {proto} . {np} : goto {ext} }}"
            );
        }
    }
    f
}

/// How many rules (`-A` lines) an iptables-restore text holds, per table.
pub fn count_iptables_rules(text: &str) -> (usize, usize) {
    let (mut filter, mut nat, mut table) = (0, 0, "");
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = if t == "nat" { "nat" } else { "filter" };
        } else if line.starts_with("-A ") {
            if table == "nat" {
                nat += 1;
            } else {
                filter += 1;
            }
        }
    }
    (filter, nat)
}

// ---------------------------------------------------------------------------------------------
// SHA-256 and RFC 4648 base32, just enough for kube-proxy's chain names (no crate needed).

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// SHA-256 of `data` (FIPS 180-4).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

/// RFC 4648 base32 (Go's `base32.StdEncoding`), with padding.
pub fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let v = buf.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let chars = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < chars {
                out.push(char::from(ALPHABET[((v >> (35 - 5 * i)) & 31) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;
    use crate::services::{Position, Proto, ServiceSet};

    fn svc(ns: &str, name: &str, cip: [u8; 4], np: Option<u16>, ep: u8) -> ServicePort {
        ServicePort {
            namespace: ns.into(),
            name: name.into(),
            port_name: "p80".into(),
            proto: Proto::Tcp,
            cluster_ip: Ipv4Addr::from(cip),
            port: 80,
            node_port: np,
            endpoints: vec![SocketAddrV4::new(Ipv4Addr::new(10, 180, 0, ep), 80)],
        }
    }

    fn cfg() -> NodeConfig {
        NodeConfig {
            cluster_cidr: "10.0.0.0/8".into(),
            node_ips: vec![Ipv4Addr::new(192, 168, 0, 2)],
        }
    }

    #[test]
    fn sha256_and_base32_vectors() {
        let hex: String = sha256(b"abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let hex: String = sha256(&[b'a'; 1000])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
        );
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI======");
        assert_eq!(base32(b"fooba"), "MZXW6YTB");
        assert_eq!(base32(b""), "");
    }

    /// Chain names of kube-proxy's own test fixtures (pkg/proxy/iptables/proxier_test.go and
    /// pkg/proxy/nftables/proxier_test.go): ns1/svc1:p80 with endpoint 10.180.0.1:80.
    #[test]
    fn chain_names_match_kube_proxy() {
        let p = svc("ns1", "svc1", [172, 30, 0, 41], None, 1);
        assert_eq!(svc_chain(&p), "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(sep_chain(&p, "10.180.0.1:80"), "KUBE-SEP-SXIVWICOYRO3J4NJ");
        assert_eq!(nft_base(&p), "ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(
            nft_ep_base(&p, "10.180.0.1:80"),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        let p3 = svc("ns3", "svc3", [172, 30, 0, 43], Some(3003), 3);
        assert_eq!(ext_chain(&p3), "KUBE-EXT-X27LE4BHSL4DOUIK");
    }

    #[test]
    fn iptables_shape() {
        let p = svc("ns3", "svc3", [172, 30, 0, 43], Some(3003), 3);
        let text = iptables_restore(&[p], &cfg());
        for want in [
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "-A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK",
            "-A KUBE-SERVICES -m comment --comment \"ns3/svc3:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK",
            "-A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment \"masquerade traffic for ns3/svc3:p80 external destinations\" -j KUBE-MARK-MASQ",
            "-A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK",
            "-A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment \"ns3/svc3:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
        // The NodePort jump is the last rule of KUBE-SERVICES.
        let last = text
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES "))
            .expect("KUBE-SERVICES rules");
        assert!(last.ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"));
        // Every chain used is declared, every declared chain is in the right table.
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        for l in text.lines().filter(|l| l.starts_with("-A ")) {
            let chain = l.split_whitespace().nth(1).expect("chain");
            assert!(declared.contains(&chain), "undeclared chain {chain}");
        }
    }

    #[test]
    fn iptables_probabilities_and_order() {
        let pod = |p| SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 10), p);
        let set = ServiceSet::synthetic(3, Position::Middle, true, &[pod(8080)]).expect("set");
        let text = iptables_restore(&set.ports, &cfg());
        let probs: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("bench/svc-0:p80-tcp ->"))
            .map(|l| {
                l.split("--probability ")
                    .nth(1)
                    .map_or("last", |r| r.split(' ').next().unwrap_or(""))
            })
            .collect();
        assert_eq!(
            probs,
            [
                "0.1000000000",
                "0.1111111111",
                "0.1250000000",
                "0.1428571429",
                "0.1666666667",
                "0.2000000000",
                "0.2500000000",
                "0.3333333333",
                "0.5000000000",
                "last"
            ]
        );
        // KUBE-SERVICES lists the Services in set order: svc-0, svc-1 (tcp, udp), svc-2.
        let order: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -m comment --comment \"bench/"))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        assert_eq!(
            order,
            [
                "bench/svc-0:p80-tcp cluster IP",
                "bench/svc-1:p80-tcp cluster IP",
                "bench/svc-1:p80-udp cluster IP",
                "bench/svc-2:p80-tcp cluster IP"
            ]
        );
        let (filter, nat) = count_iptables_rules(&text);
        assert_eq!(filter, 15);
        // 3 jumps + 4 static + per port: 2 nodeport + 1 service + 2 ext + 1 masq + 2/endpoint
        // + 1/endpoint; plus the nodeports jump.
        let per_port = |eps: usize| 2 + 1 + 2 + 1 + 3 * eps;
        assert_eq!(nat, 3 + 4 + 1 + 2 * per_port(10) + 2 * per_port(1));
    }

    #[test]
    fn nftables_shape() {
        let p = svc("ns3", "svc3", [172, 30, 0, 43], Some(3003), 3);
        let text = nftables_script(&[p], &cfg());
        for want in [
            "add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80",
            "add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 }",
            "add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade",
            "add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80",
            "add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80",
            "add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }",
            "add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }",
            "add element ip kube-proxy nodeport-ips { 192.168.0.2 }",
            "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
            "add rule ip kube-proxy masquerading masquerade fully-random",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn nftables_numgen_lists_every_endpoint() {
        let pod = |p| SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 10), p);
        let set =
            ServiceSet::synthetic(2, Position::End, true, &[pod(8080), pod(8081)]).expect("set");
        let text = nftables_script(&set.ports, &cfg());
        let vmap = text
            .lines()
            .find(|l| l.contains("bench/svc-0/tcp/p80-tcp numgen"))
            .expect("svc-0 numgen rule");
        assert!(vmap.contains("numgen random mod 10 vmap { 0 : goto endpoint-"));
        assert_eq!(vmap.matches(": goto endpoint-").count(), 10);
        let udp = text
            .lines()
            .find(|l| l.contains("meta l4proto udp dnat to 10.244.0.10:8081"))
            .expect("udp endpoint rule");
        assert!(udp.contains("bench/svc-1/udp/p80-udp__10.244.0.10/8081"));
        assert!(text.contains(
            "add element ip kube-proxy service-nodeports { udp . 30001 : goto external-"
        ));
    }
}
