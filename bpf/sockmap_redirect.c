/* Sockmap acceleration of app <-> sidecar loopback traffic (Merbridge-style).
 *
 * sock_ops (attached to the workload's cgroup v2, or to every meshed Pod's) puts each established
 * TCP socket whose both ends are on loopback and one end is a sidecar port into a sockhash,
 * keyed by its network namespace and its 4-tuple as the socket sees it. The namespace is part
 * of the key because one sockhash serves every Pod of the node, and each Pod has its own
 * loopback: the same 127.0.0.1 4-tuple in two Pods are two different connections. sk_msg (attached to that sockhash) then hands every message straight
 * to the peer socket's receive queue (BPF_F_INGRESS), skipping the TCP/IP stack twice.
 * The kernel removes a socket from the sockhash when it closes, so entries do not go stale.
 * Only uapi contexts are read (bpf_sock_ops, sk_msg_md): struct sock offsets are wrong here.
 */
#include <uapi/linux/bpf.h>
#include "meshlet_pin.h"

#ifndef MAX_SOCKETS
#define MAX_SOCKETS 65535
#endif
#ifndef MAX_PORTS
#define MAX_PORTS 64
#endif

#define AF_INET 2
#define STAT_REDIRECTED_BYTES 0
#define STAT_REDIRECTED_MSGS 1
#define STAT_FALLBACK_MSGS 2 /* peer not (yet) in the map: the normal path carried it */
#define STAT_INSERTED 3
#define STATS 4

/* The 4-tuple from the socket's own side: a socket finds its peer by swapping the ends.
 * Addresses as the kernel gives them (network order), ports in host order. */
struct sock_key {
    u64 netns; /* bpf_get_netns_cookie: loopback peers share it */
    u32 sip;
    u32 dip;
    u32 sport;
    u32 dport;
};

/* BPF_SOCKHASH spelled out, because its macro has no way to name a pinned map. */
struct meshlet_socks_table_t {
    struct sock_key key;
    int leaf;
    int (*update)(struct sock_key *, int *);
    int (*delete)(struct sock_key *);
    int (*sock_hash_update)(void *, void *, u64);
    int (*msg_redirect_hash)(void *, void *, u64);
    int (*sk_redirect_hash)(void *, void *, u64);
    u32 max_entries;
};
__attribute__((section("maps/sockhash" MESHLET_PINNED(meshlet_socks))))
struct meshlet_socks_table_t meshlet_socks = {.max_entries = MAX_SOCKETS};

/* Sidecar ports (15001, 15006, configured), host order: one end must be one of them. */
BPF_TABLE("hash" MESHLET_PINNED(meshlet_ports), u32, u8, meshlet_ports, MAX_PORTS);
BPF_TABLE("percpu_array" MESHLET_PINNED(meshlet_stats), int, u64, meshlet_stats, STATS);

static __always_inline void stat_add(u32 index, u64 amount)
{
    u64 *value = meshlet_stats.lookup(&index);
    if (value)
        *value += amount;
}

static __always_inline int is_loopback(u32 ip)
{
    return (ip & 0xff) == 127; /* first octet of a network-order address on little endian */
}

/* remote_port is the network-order port shifted into the top half: ntohl gives host order. */
static __always_inline u32 remote_port_host(u32 remote_port)
{
    return bpf_ntohl(remote_port);
}

int meshlet_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        return 1;
    if (skops->family != AF_INET)
        return 1;
    if (!is_loopback(skops->local_ip4) || !is_loopback(skops->remote_ip4))
        return 1;
    struct sock_key key = {
        .netns = bpf_get_netns_cookie(skops),
        .sip = skops->local_ip4,
        .dip = skops->remote_ip4,
        .sport = skops->local_port,
        .dport = remote_port_host(skops->remote_port),
    };
    if (!meshlet_ports.lookup(&key.sport) && !meshlet_ports.lookup(&key.dport))
        return 1;
    int err = meshlet_socks.sock_hash_update(skops, &key, BPF_NOEXIST);
    if (err == 0)
        stat_add(STAT_INSERTED, 1);
    return 1;
}

int meshlet_skmsg(struct sk_msg_md *msg)
{
    struct sock_key peer = {
        .netns = bpf_get_netns_cookie(msg),
        .sip = msg->remote_ip4,
        .dip = msg->local_ip4,
        .sport = remote_port_host(msg->remote_port),
        .dport = msg->local_port,
    };
    u64 size = msg->size;
    int verdict = meshlet_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    if (verdict == SK_PASS) {
        stat_add(STAT_REDIRECTED_BYTES, size);
        stat_add(STAT_REDIRECTED_MSGS, 1);
    } else {
        stat_add(STAT_FALLBACK_MSGS, 1);
    }
    return SK_PASS; /* a redirect was set above, or the message takes the normal path */
}
