//! Verdict reasons, counted per CPU in `LB_STATS`, and the counter type shared with userspace.
use bytemuck::{Pod, Zeroable};

/// Packets and bytes. Value of `LB_STATS` and `LB_SVC_STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Per-CPU token bucket (`LB_REJECT_RATE`): tokens left and when it was last filled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RateLimit {
    pub tokens: u64,
    pub last_ns: u64,
}

/// Why the datapath passed, forwarded or dropped a packet. Index into `LB_STATS`.
///
/// Policies (documented here, enforced in `lb-ebpf`):
/// * IPv4 fragments: the first one (it has the L4 header) is translated like any packet and
///   its translation recorded in `LB4_FRAG` under (source, destination, IP id, protocol);
///   the ones that follow get the same addresses from there. A non-first fragment without
///   a record (it overtook its first one, or the record was evicted) passes untouched
///   (`XdpPassFragment`). Packets with IP options pass untouched.
/// * A frontend with no usable backend answers a new flow with an ICMP port-unreachable
///   (`XdpRejectNoBackend`), rate-limited per CPU; beyond the rate, or when it cannot, it
///   drops (`DropNoBackend`).
/// * The ingress program runs at XDP (`--attach xdp`, the default) or at TC ingress
///   (`--attach tc`); its verdicts keep their `Xdp*` names at either hook. At TC ingress a
///   frontend without backends drops (`XdpDropNoBackend`): there is no reject from TC.
/// * Malformed headers are dropped: the kernel would drop them too, and they must never be
///   rewritten or create conntrack state.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// XDP: not IPv4 (ARP, IPv6, ...), passed.
    XdpPassNonIpv4 = 0,
    /// XDP: IPv4 but matched no frontend (or not TCP/UDP), passed.
    XdpPassNotService = 1,
    /// XDP: a non-first IPv4 fragment without a translation record (none needed, or its
    /// first fragment was not seen), passed untouched.
    XdpPassFragment = 2,
    /// XDP: IPv4 header with options, passed.
    XdpPassIpOptions = 3,
    /// XDP: DNAT of a new flow (conntrack entry created), passed to the stack.
    XdpFwdNewFlow = 4,
    /// XDP: DNAT of a tracked flow, passed to the stack.
    XdpFwdTracked = 5,
    /// XDP: frontend without a usable backend, dropped.
    XdpDropNoBackend = 6,
    /// XDP: frame shorter than an Ethernet header, dropped.
    XdpDropMalformedL2 = 7,
    /// XDP: bad IPv4 header (truncated, version, IHL, tot_len), dropped.
    XdpDropMalformedL3 = 8,
    /// XDP: bad TCP/UDP header (truncated, data offset, length), dropped.
    XdpDropMalformedL4 = 9,
    /// XDP: conntrack insert failed, dropped.
    XdpDropCtInsert = 10,
    /// XDP: a backend slot points at a missing backend (agent mid-update), dropped.
    XdpDropBackendMissing = 11,
    /// TC egress: reply reverse-NATed to the frontend address.
    TcRevNat = 16,
    /// TC egress: no conntrack entry, passed untouched.
    TcPassNotTracked = 17,
    /// TC egress: not IPv4 TCP/UDP, passed untouched.
    TcPassOther = 18,
    /// TC egress: header we cannot parse, passed untouched (egress is the stack's own traffic).
    TcPassMalformed = 19,
    /// TC egress: a checksum/store helper failed, dropped.
    TcDropRewrite = 20,
    /// XDP: DNAT + SNAT of a flow to a remote backend, sent back out with XDP_TX.
    XdpSnatTx = 21,
    /// XDP: DNAT + SNAT to a remote backend, sent out another interface (XDP_REDIRECT).
    XdpSnatRedirect = 22,
    /// XDP: DNAT + SNAT to a remote backend, no FIB/neighbour result: passed to the stack.
    XdpSnatPass = 23,
    /// XDP: a remote backend's reply, reverse SNAT + DNAT, sent back out with XDP_TX.
    XdpRevSnatTx = 24,
    /// XDP: a remote backend's reply, reverse-translated, sent out another interface.
    XdpRevSnatRedirect = 25,
    /// XDP: a remote backend's reply, reverse-translated, passed to the stack (no FIB result).
    XdpRevSnatPass = 26,
    /// XDP: no free SNAT port for a new flow to a remote backend, dropped.
    XdpDropSnatExhausted = 27,
    /// Socket `connect4`: a Service address translated to a backend (one per connect).
    SockConnectXlate = 32,
    /// Socket `sendmsg4`: an unconnected datagram to a Service sent to a backend.
    SockSendmsgXlate = 33,
    /// Socket `recvmsg4`: a backend's datagram given the Service address as its source.
    SockRecvmsgRevNat = 34,
    /// Socket `getpeername4`: the Service address returned as the peer.
    SockGetpeernameRevNat = 35,
    /// Socket `connect4`/`sendmsg4`: a Service without a usable backend, refused at once
    /// with ECONNREFUSED (kube-proxy's REJECT).
    SockRejectNoBackend = 36,
    /// Socket `connect4`/`sendmsg4`: the reverse translation could not be recorded (or a
    /// slot pointed at a missing backend), refused with ENOMEM / EHOSTUNREACH.
    SockRejectInternal = 37,
    /// Socket `connect4`/`sendmsg4`: a NodePort on 127.0.0.0/8 with
    /// `--localhost-nodeports false`, left untouched.
    SockPassLocalhostNodePort = 38,
    /// Event (not a packet verdict; counts conntrack entries, two per flow or one for a
    /// SNATed flow): entries created for new flows.
    CtCreated = 40,
    /// Event: entries of a flow idle past its timeout, removed on its next packet (the
    /// flow is then created again).
    CtExpired = 41,
    /// Event: one direction's entry found evicted and rebuilt from the other's.
    CtRestored = 42,
    /// XDP: a new flow to a frontend without backends answered with an ICMP
    /// port-unreachable (kube-proxy's REJECT), sent back with XDP_TX.
    XdpRejectNoBackend = 43,
    /// XDP: an ICMP error quoting a DNATed flow translated for its backend, passed.
    XdpIcmpErrDnat = 44,
    /// XDP: an ICMP error quoting a SNATed flow translated back for its client, sent on.
    XdpIcmpErrSnat = 45,
    /// TC egress: an ICMP error from a backend translated to come from the frontend.
    TcIcmpErrRevNat = 46,
    /// XDP: a non-first fragment translated like its datagram's first one.
    XdpFragFwd = 47,
    /// TC egress: a non-first reply fragment reverse-NATed like its first one.
    TcFragRevNat = 48,
    /// Event: entries removed so that a flow picks again (a SYN on a closed tuple, a UDP
    /// flow whose backend is gone).
    CtRemoved = 49,
    /// Event (`--attach tc`): a DNATed packet for a pod on this node handed straight to the
    /// pod's namespace (`bpf_redirect_peer` to its host-side veth), skipping the node's stack.
    TcRedirectPeer = 50,
    /// Event (`--attach tc`): a translated packet sent out of the FIB's egress device
    /// (`bpf_redirect`, MACs from the FIB): a pod device that is not a veth, another node.
    TcRedirect = 51,
    /// Event (`--attach tc`): as `TcRedirect`, but the next hop had no neighbour entry yet:
    /// sent with `bpf_redirect_neigh`, which resolves it.
    TcRedirectNeigh = 52,
}

impl Reason {
    pub const ALL: [Reason; 44] = [
        Reason::XdpPassNonIpv4,
        Reason::XdpPassNotService,
        Reason::XdpPassFragment,
        Reason::XdpPassIpOptions,
        Reason::XdpFwdNewFlow,
        Reason::XdpFwdTracked,
        Reason::XdpDropNoBackend,
        Reason::XdpDropMalformedL2,
        Reason::XdpDropMalformedL3,
        Reason::XdpDropMalformedL4,
        Reason::XdpDropCtInsert,
        Reason::XdpDropBackendMissing,
        Reason::TcRevNat,
        Reason::TcPassNotTracked,
        Reason::TcPassOther,
        Reason::TcPassMalformed,
        Reason::TcDropRewrite,
        Reason::XdpSnatTx,
        Reason::XdpSnatRedirect,
        Reason::XdpSnatPass,
        Reason::XdpRevSnatTx,
        Reason::XdpRevSnatRedirect,
        Reason::XdpRevSnatPass,
        Reason::XdpDropSnatExhausted,
        Reason::SockConnectXlate,
        Reason::SockSendmsgXlate,
        Reason::SockRecvmsgRevNat,
        Reason::SockGetpeernameRevNat,
        Reason::SockRejectNoBackend,
        Reason::SockRejectInternal,
        Reason::SockPassLocalhostNodePort,
        Reason::CtCreated,
        Reason::CtExpired,
        Reason::CtRestored,
        Reason::XdpRejectNoBackend,
        Reason::XdpIcmpErrDnat,
        Reason::XdpIcmpErrSnat,
        Reason::TcIcmpErrRevNat,
        Reason::XdpFragFwd,
        Reason::TcFragRevNat,
        Reason::CtRemoved,
        Reason::TcRedirectPeer,
        Reason::TcRedirect,
        Reason::TcRedirectNeigh,
    ];

    /// A stable snake_case name for tables and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::XdpPassNonIpv4 => "xdp_pass_non_ipv4",
            Reason::XdpPassNotService => "xdp_pass_not_service",
            Reason::XdpPassFragment => "xdp_pass_fragment",
            Reason::XdpPassIpOptions => "xdp_pass_ip_options",
            Reason::XdpFwdNewFlow => "xdp_fwd_new_flow",
            Reason::XdpFwdTracked => "xdp_fwd_tracked",
            Reason::XdpDropNoBackend => "xdp_drop_no_backend",
            Reason::XdpDropMalformedL2 => "xdp_drop_malformed_l2",
            Reason::XdpDropMalformedL3 => "xdp_drop_malformed_l3",
            Reason::XdpDropMalformedL4 => "xdp_drop_malformed_l4",
            Reason::XdpDropCtInsert => "xdp_drop_ct_insert",
            Reason::XdpDropBackendMissing => "xdp_drop_backend_missing",
            Reason::TcRevNat => "tc_revnat",
            Reason::TcPassNotTracked => "tc_pass_not_tracked",
            Reason::TcPassOther => "tc_pass_other",
            Reason::TcPassMalformed => "tc_pass_malformed",
            Reason::TcDropRewrite => "tc_drop_rewrite",
            Reason::XdpSnatTx => "xdp_snat_tx",
            Reason::XdpSnatRedirect => "xdp_snat_redirect",
            Reason::XdpSnatPass => "xdp_snat_pass",
            Reason::XdpRevSnatTx => "xdp_revsnat_tx",
            Reason::XdpRevSnatRedirect => "xdp_revsnat_redirect",
            Reason::XdpRevSnatPass => "xdp_revsnat_pass",
            Reason::XdpDropSnatExhausted => "xdp_drop_snat_exhausted",
            Reason::SockConnectXlate => "sock_connect_xlate",
            Reason::SockSendmsgXlate => "sock_sendmsg_xlate",
            Reason::SockRecvmsgRevNat => "sock_recvmsg_revnat",
            Reason::SockGetpeernameRevNat => "sock_getpeername_revnat",
            Reason::SockRejectNoBackend => "sock_reject_no_backend",
            Reason::SockRejectInternal => "sock_reject_internal",
            Reason::SockPassLocalhostNodePort => "sock_pass_localhost_nodeport",
            Reason::CtCreated => "ct_created",
            Reason::CtExpired => "ct_expired",
            Reason::CtRestored => "ct_restored",
            Reason::XdpRejectNoBackend => "xdp_reject_no_backend",
            Reason::XdpIcmpErrDnat => "xdp_icmp_err_dnat",
            Reason::XdpIcmpErrSnat => "xdp_icmp_err_snat",
            Reason::TcIcmpErrRevNat => "tc_icmp_err_revnat",
            Reason::XdpFragFwd => "xdp_frag_fwd",
            Reason::TcFragRevNat => "tc_frag_revnat",
            Reason::CtRemoved => "ct_removed",
            Reason::TcRedirectPeer => "tc_redirect_peer",
            Reason::TcRedirect => "tc_redirect",
            Reason::TcRedirectNeigh => "tc_redirect_neigh",
        }
    }

    /// Whether this is an event counter (conntrack lifecycle), not a packet verdict: the
    /// packet it happened to is counted under its own verdict as well.
    pub const fn is_event(self) -> bool {
        matches!(
            self,
            Reason::CtCreated
                | Reason::CtExpired
                | Reason::CtRestored
                | Reason::CtRemoved
                | Reason::TcRedirectPeer
                | Reason::TcRedirect
                | Reason::TcRedirectNeigh
        )
    }

    /// Whether this reason is a drop (as opposed to pass or forward).
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::XdpDropNoBackend
                | Reason::XdpDropMalformedL2
                | Reason::XdpDropMalformedL3
                | Reason::XdpDropMalformedL4
                | Reason::XdpDropCtInsert
                | Reason::XdpDropBackendMissing
                | Reason::TcDropRewrite
                | Reason::XdpDropSnatExhausted
                | Reason::SockRejectNoBackend
                | Reason::SockRejectInternal
        )
    }
}
