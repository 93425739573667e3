//! Kernel enforcement of STRICT mTLS: a TC program on the host side of a
//! workload's veth (egress, i.e. traffic heading into the pod) answers a TCP
//! SYN to a STRICT workload with a RST, unless the packet comes from the node
//! proxy (its sockets carry the proxy's `SO_MARK`, which survives to the
//! host-side egress hook). The client sees `ECONNREFUSED` at once, wherever it
//! is; traffic inside the pod never crosses the veth and is untouched.
//!
//! Connections from the node itself (a connecting socket of its network
//! namespace sent the SYN) pass unless the loader says otherwise
//! (`CONFIG_F_STRICT_ALLOWS_NODE`): kubelet's probes come from there.
//!
//! A TCP fragment to a STRICT workload is dropped (the pod would reassemble
//! a SYN whose flags were never seen here); IPv6 extension headers are
//! walked to the upper-layer header, so that a SYN behind them is refused
//! and anything else behind them passes.
//!
//! The RST is the SYN turned around in place: MACs, addresses and ports
//! swapped (none of which changes a checksum), seq 0, ack = SYN seq + 1 +
//! payload, flags RST|ACK, then handed back to the same device's ingress.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_CURRENT_NETNS, BPF_F_INGRESS, BPF_TCP_SYN_SENT, TC_ACT_SHOT, TC_ACT_UNSPEC,
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::generated::{bpf_redirect, bpf_sk_fullsock, bpf_sk_lookup_tcp, bpf_sk_release},
    macros::classifier,
    programs::TcContext,
};
use ebpf_lb_common::{CONFIG_F_STRICT_ALLOWS_NODE, FAMILY_V4, FAMILY_V6, MODE_STRICT, WorkloadKey};

use super::{AF_INET, REFUSALS, WORKLOADS, config};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Offset of the checksum in the TCP header.
const TCP_CSUM: usize = 16;

/// What the guard does not refuse goes on to the next program on the
/// device, then the device's own path (`TCX_NEXT`, `TC_ACT_UNSPEC`): "OK"
/// would end the chain under TCX, and the programs attached after the
/// guard (a CNI's own policy and NAT on the pod's veth) would never see
/// the packet.
const NEXT: i32 = TC_ACT_UNSPEC;

#[classifier]
pub fn sluice_strict(ctx: TcContext) -> i32 {
    try_strict(&ctx).unwrap_or(NEXT)
}

/// Where the TCP header starts, the TCP segment length, and the destination.
struct Parsed {
    /// [`OTHER`], [`TCP`] or [`OPAQUE`].
    kind: u8,
    l4: usize,
    l4_len: usize,
    dst: WorkloadKey,
    /// Offset and length of the two addresses (source first).
    addr_off: usize,
    addr_len: usize,
}

/// IPv6 extension headers walked to find the TCP header behind them.
const MAX_EXT_HEADERS: usize = 4;

/// What a packet heading into a pod is, for the guard ([`Parsed::kind`]).
/// (Plain constants: an enum carrying data leaves registers the verifier
/// sees read uninitialised.)
/// Not TCP (or not IP): passes.
const OTHER: u8 = 0;
/// A TCP segment whose header is at `l4`.
const TCP: u8 = 1;
/// A TCP fragment (or one behind headers that could not be walked) to
/// `dst`: its flags cannot be read, and the reassembled segment may be a SYN.
const OPAQUE: u8 = 2;

#[inline(always)]
fn other() -> Parsed {
    Parsed {
        kind: OTHER,
        l4: 0,
        l4_len: 0,
        dst: WorkloadKey {
            addr: [0; 4],
            family: 0,
            _pad: [0; 3],
        },
        addr_off: 0,
        addr_len: 0,
    }
}

#[inline(always)]
fn opaque(dst: WorkloadKey) -> Parsed {
    Parsed {
        kind: OPAQUE,
        dst,
        ..other()
    }
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Parsed, i64> {
    let proto = u16::from_be(ctx.load::<u16>(12)?);
    if proto == ETH_P_IP {
        let vihl: u8 = ctx.load(ETH_HLEN)?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return Ok(other());
        }
        if ctx.load::<u8>(ETH_HLEN + 9)? != IPPROTO_TCP {
            return Ok(other());
        }
        let daddr: u32 = ctx.load(ETH_HLEN + 16)?;
        let dst = WorkloadKey {
            addr: [daddr, 0, 0, 0],
            family: FAMILY_V4,
            _pad: [0; 3],
        };
        // More fragments, or a fragment offset: the pod reassembles a
        // segment whose flags this fragment may not hold (or hold at
        // another place: a later fragment's bytes are not the TCP header).
        let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6)?);
        if frag & 0x3fff != 0 {
            return Ok(opaque(dst));
        }
        let tot_len = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2)?) as usize;
        Ok(Parsed {
            kind: TCP,
            l4: ETH_HLEN + ihl,
            l4_len: tot_len.saturating_sub(ihl),
            dst,
            addr_off: ETH_HLEN + 12,
            addr_len: 4,
        })
    } else if proto == ETH_P_IPV6 {
        let d0: u32 = ctx.load(ETH_HLEN + 24)?;
        let d1: u32 = ctx.load(ETH_HLEN + 28)?;
        let d2: u32 = ctx.load(ETH_HLEN + 32)?;
        let d3: u32 = ctx.load(ETH_HLEN + 36)?;
        let dst = WorkloadKey {
            addr: [d0, d1, d2, d3],
            family: FAMILY_V6,
            _pad: [0; 3],
        };
        let payload = u16::from_be(ctx.load::<u16>(ETH_HLEN + 4)?) as usize;
        let mut next: u8 = ctx.load(ETH_HLEN + 6)?;
        let mut off = ETH_HLEN + 40;
        // Extension headers in front of the upper-layer header: walked (a
        // few), so that a SYN behind them is seen, and a UDP datagram or
        // anything else behind them passes.
        for _ in 0..MAX_EXT_HEADERS {
            match next {
                IPPROTO_TCP => {
                    return Ok(Parsed {
                        kind: TCP,
                        l4: off,
                        l4_len: payload.saturating_sub(off - ETH_HLEN - 40),
                        dst,
                        addr_off: ETH_HLEN + 8,
                        addr_len: 16,
                    });
                }
                // Hop-by-hop, routing, destination options: (len + 1) * 8.
                IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                    let len: u8 = ctx.load(off + 1)?;
                    next = ctx.load(off)?;
                    off += (len as usize + 1) * 8;
                }
                // Authentication header: (len + 2) * 4.
                IPV6_AH => {
                    let len: u8 = ctx.load(off + 1)?;
                    next = ctx.load(off)?;
                    off += (len as usize + 2) * 4;
                }
                // A fragment: of TCP (or of more headers), its flags may
                // be in another fragment; of anything else, it passes.
                IPV6_FRAGMENT => {
                    let inner: u8 = ctx.load(off)?;
                    return Ok(match inner {
                        IPPROTO_TCP | IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH => {
                            opaque(dst)
                        }
                        _ => other(),
                    });
                }
                _ => return Ok(other()),
            }
        }
        // More headers than walked: what follows is unknown.
        Ok(if is_ext_header(next) || next == IPPROTO_TCP {
            opaque(dst)
        } else {
            other()
        })
    } else {
        Ok(other())
    }
}

const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;

#[inline(always)]
fn is_ext_header(next: u8) -> bool {
    matches!(
        next,
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AH | IPV6_DSTOPTS
    )
}

#[inline(always)]
fn strict(dst: &WorkloadKey) -> bool {
    WORKLOADS
        .get_ptr(dst)
        .is_some_and(|p| unsafe { (*p).mode } == MODE_STRICT)
}

fn try_strict(ctx: &TcContext) -> Result<i32, i64> {
    // The node proxy's own packets always pass.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if let Some(cfg) = config()
        && cfg.proxy_mark != 0
        && mark == cfg.proxy_mark
    {
        return Ok(NEXT);
    }
    let p = parse(ctx)?;
    if p.kind == OTHER {
        return Ok(NEXT);
    }
    if p.kind == OPAQUE {
        // A TCP fragment to a STRICT workload is dropped: the pod would
        // reassemble a SYN this program never saw. (TCP is not fragmented
        // in practice: it sends segments that fit the path.)
        return Ok(if strict(&p.dst) { TC_ACT_SHOT } else { NEXT });
    }
    // Only connection attempts: a SYN without ACK.
    let flags: u8 = ctx.load(p.l4 + 13)?;
    if flags & (TCP_SYN | TCP_ACK) != TCP_SYN || !strict(&p.dst) {
        return Ok(NEXT);
    }
    // The node proxy's SYN whose packet mark a rule on the way rewrote
    // (kube-proxy's iptables mode flips 0x4000, which the proxy's mark has,
    // on what it masquerades, and masquerades it): the socket that sent it
    // still carries the proxy's mark.
    if let Some(cfg) = config()
        && cfg.proxy_mark != 0
        && sent_by_node_socket_marked(ctx, cfg.proxy_mark)
    {
        return Ok(NEXT);
    }
    // From the node itself (kubelet's probes): a connecting socket of the
    // node's own network namespace sent it.
    if config().is_some_and(|c| c.flags & CONFIG_F_STRICT_ALLOWS_NODE != 0)
        && from_node_socket(ctx, &p)?
    {
        return Ok(NEXT);
    }
    match REFUSALS.get_ptr_mut(p.dst) {
        Some(c) => unsafe { *c += 1 },
        None => {
            let _ = REFUSALS.insert(p.dst, 1, BPF_ANY as u64);
        }
    }
    // A reset that could not be made (its rewrite failed part way) is a
    // drop: the SYN, refused, never reaches the pod in whatever state.
    Ok(reject(ctx, &p).unwrap_or(TC_ACT_SHOT))
}

/// Whether the packet carries the socket that sent it, with `mark`, and that
/// socket is one of the node's own (connecting, SYN_SENT). NAT on the way
/// changes the packet, not its socket; the socket is found again by its own
/// addresses in this (the node's) namespace, because a CNI that forwards
/// with `bpf_redirect` hands a pod's packet over with the pod's socket, and
/// a pod may set any mark on its own socket (`CAP_NET_RAW` does, since 5.17).
#[inline(always)]
fn sent_by_node_socket_marked(ctx: &TcContext, mark: u32) -> bool {
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a socket of the packet's; a full one's fields are readable.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() || unsafe { core::ptr::read_volatile(&(*full).mark) } != mark {
        return false;
    }
    // SAFETY: the full socket's fields are readable.
    let (family, sport, dport) = unsafe {
        (
            core::ptr::read_volatile(&(*full).family),
            core::ptr::read_volatile(&(*full).dst_port),
            (core::ptr::read_volatile(&(*full).src_port) as u16).to_be(),
        )
    };
    // Looked up as the node would see the answer: from the socket's peer to
    // the socket.
    let peers = unsafe {
        if family == AF_INET {
            Peers::V4 {
                from: core::ptr::read_volatile(&(*full).dst_ip4),
                to: core::ptr::read_volatile(&(*full).src_ip4),
            }
        } else {
            Peers::V6 {
                from: core::ptr::read_volatile(&(*full).dst_ip6),
                to: core::ptr::read_volatile(&(*full).src_ip6),
            }
        }
    };
    connecting_socket_mark(ctx, peers, sport, dport) == Some(mark)
}

/// A TCP 4-tuple as the node would see an answer: from `from` to `to`.
enum Peers {
    V4 { from: u32, to: u32 },
    V6 { from: [u32; 4], to: [u32; 4] },
}

/// The `SO_MARK` of the socket of this (the node's) network namespace that
/// is connecting (SYN_SENT) with the 4-tuple whose answer goes from
/// `peers.from` port `sport` to `peers.to` port `dport` (network order).
#[inline(always)]
fn connecting_socket_mark(ctx: &TcContext, peers: Peers, sport: u16, dport: u16) -> Option<u32> {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = match peers {
        Peers::V4 { from, to } => {
            tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: from,
                daddr: to,
                sport,
                dport,
            };
            core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
        }
        Peers::V6 { from, to } => {
            tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                saddr: from,
                daddr: to,
                sport,
                dport,
            };
            core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
        }
    };
    // SAFETY: a tuple of the size given; the socket found is released.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.skb.skb as *mut _,
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return None;
    }
    let (state, mark) = unsafe {
        (
            core::ptr::read_volatile(&(*sk).state),
            core::ptr::read_volatile(&(*sk).mark),
        )
    };
    unsafe { bpf_sk_release(sk as *mut _) };
    (state == BPF_TCP_SYN_SENT).then_some(mark)
}

/// Whether the SYN was sent by a socket of the node's own network namespace
/// (where the host side of the veth is): one connecting (SYN_SENT) with the
/// SYN's 4-tuple there. Carrying a socket is not enough: a CNI that forwards
/// with `bpf_redirect` hands a pod's packet over with the pod's socket, and a
/// listener matched by the lookup (any address, the SYN's source port) is not
/// the sender either.
#[inline(always)]
fn from_node_socket(ctx: &TcContext, p: &Parsed) -> Result<bool, i64> {
    // A packet the node forwarded (from a pod or another node) has none.
    if unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }.is_null() {
        return Ok(false);
    }
    let sport: u16 = ctx.load(p.l4)?;
    let dport: u16 = ctx.load(p.l4 + 2)?;
    // Looked up as the node would see the answer: from the SYN's
    // destination to its source.
    let peers = if p.addr_len == 4 {
        Peers::V4 {
            from: ctx.load(p.addr_off + 4)?,
            to: ctx.load(p.addr_off)?,
        }
    } else {
        Peers::V6 {
            from: ctx.load(p.addr_off + 16)?,
            to: ctx.load(p.addr_off)?,
        }
    };
    Ok(connecting_socket_mark(ctx, peers, dport, sport).is_some())
}

/// Turns the SYN into the RST|ACK that answers it and sends it back.
#[inline(always)]
fn reject(ctx: &TcContext, p: &Parsed) -> Result<i32, i64> {
    // Ethernet addresses.
    // Fixed-size loads: the verifier refuses a length it cannot bound away from 0.
    let macs: [u8; 12] = ctx.load(0)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0)?;

    // IP addresses (the pseudo-header sum does not change).
    if p.addr_len == 4 {
        let src: u32 = ctx.load(p.addr_off)?;
        let dst: u32 = ctx.load(p.addr_off + 4)?;
        ctx.store(p.addr_off, &dst, 0)?;
        ctx.store(p.addr_off + 4, &src, 0)?;
    } else {
        let src: [u8; 16] = ctx.load(p.addr_off)?;
        let dst: [u8; 16] = ctx.load(p.addr_off + 16)?;
        ctx.store(p.addr_off, &dst, 0)?;
        ctx.store(p.addr_off + 16, &src, 0)?;
    }

    // Ports.
    let sport: u16 = ctx.load(p.l4)?;
    let dport: u16 = ctx.load(p.l4 + 2)?;
    ctx.store(p.l4, &dport, 0)?;
    ctx.store(p.l4 + 2, &sport, 0)?;

    // seq 0, ack = the SYN's seq + 1 + its payload.
    let seq: u32 = ctx.load(p.l4 + 4)?;
    let old_ack: u32 = ctx.load(p.l4 + 8)?;
    let doff_byte: u8 = ctx.load(p.l4 + 12)?;
    let hdr_len = ((doff_byte >> 4) as usize) * 4;
    let payload = p.l4_len.saturating_sub(hdr_len) as u32;
    let ack = u32::from_be(seq)
        .wrapping_add(1)
        .wrapping_add(payload)
        .to_be();
    ctx.store(p.l4 + 4, &0u32, 0)?;
    ctx.l4_csum_replace(p.l4 + TCP_CSUM, seq as u64, 0, 4)?;
    ctx.store(p.l4 + 8, &ack, 0)?;
    ctx.l4_csum_replace(p.l4 + TCP_CSUM, old_ack as u64, ack as u64, 4)?;

    // Flags: RST|ACK, header length kept.
    let old_word: u16 = ctx.load(p.l4 + 12)?;
    let new_word = u16::from_ne_bytes([doff_byte & 0xf0, TCP_RST | TCP_ACK]);
    ctx.store(p.l4 + 12, &new_word, 0)?;
    ctx.l4_csum_replace(p.l4 + TCP_CSUM, old_word as u64, new_word as u64, 2)?;

    ctx.set_mark(0);
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    Ok(unsafe { bpf_redirect(ifindex, BPF_F_INGRESS as u64) } as i32)
}
