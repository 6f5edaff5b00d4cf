/* Connection-level weighted split in the kernel (cgroup/connect4 + cgroup/getpeername4).
 *
 * connect4 sees every IPv4 connect() of the cgroups it is attached to (a workload's, or every
 * meshed Pod's on the node). Each of those cgroups belongs to a scope (meshlet_scopes: the
 * Pod's Kubernetes namespace; 0 on a plain host): a TrafficPolicy governs only the clients of
 * its own namespace, as a sidecar does, so a policy written in one namespace can never steer
 * another's connections. When the destination is a virtual address (VIP) of the caller's
 * scope, it picks a backend by weight and rewrites the destination before the SYN is built,
 * so no proxy is in the path at all, and it marks the socket (SO_MARK = BYPASS_MARK): the
 * injected Pod's iptables rules let marked connections past the sidecar's REDIRECT, so the
 * split is not done a second time by the sidecar. The VIP is kept in the socket's local
 * storage, and getpeername4 puts it back into what the app sees, as Cilium's socket-LB does.
 * A VIP's whole table is one hash value replaced by one update: a connect sees the old
 * weights or the new ones, never a mix (the map is not preallocated, so a replaced value
 * is freed only after readers are done with it).
 */
#include <uapi/linux/bpf.h>
#include "meshlet_pin.h"

#define SOCK_STREAM_TYPE 1
#define SOL_SOCKET_LEVEL 1
#define SO_MARK_OPTION 36

#ifndef MAX_VIPS
#define MAX_VIPS 1024
#endif
#ifndef MAX_BACKENDS
#define MAX_BACKENDS 16
#endif
#ifndef MAX_COUNTERS
#define MAX_COUNTERS 4096
#endif
#ifndef MAX_SCOPED_CGROUPS
#define MAX_SCOPED_CGROUPS 4096
#endif
#ifndef MAX_CGROUP_DEPTH
#define MAX_CGROUP_DEPTH 8 /* ancestors looked at for a scoped cgroup: a Pod's containers sit below it */
#endif
#ifndef BYPASS_MARK
#error "BYPASS_MARK comes from meshlet/ebpf/kernel_split.py via cflags"
#endif

/* Addresses in network order (as user_ip4), ports in host order. */
struct vip_key {
    u32 scope;
    u32 ip;
    u32 port;
};

struct split {
    u32 count;                 /* backends in use, <= MAX_BACKENDS */
    u32 total;                 /* sum of weights; 0 means "leave the connect alone" */
    u32 upto[MAX_BACKENDS];    /* cumulative weights: backend i takes [upto[i-1], upto[i]) */
    u32 ip[MAX_BACKENDS];
    u32 port[MAX_BACKENDS];
};

struct conn_key {
    struct vip_key vip;
    u32 backend_ip;
    u32 backend_port;
};

BPF_F_TABLE("hash" MESHLET_PINNED(meshlet_vips), struct vip_key, struct split, meshlet_vips, MAX_VIPS,
            BPF_F_NO_PREALLOC);
BPF_TABLE("percpu_hash" MESHLET_PINNED(meshlet_conns), struct conn_key, u64, meshlet_conns, MAX_COUNTERS);
/* cgroup id (a Pod's, or the --cgroup one) -> scope. */
BPF_TABLE("hash" MESHLET_PINNED(meshlet_scopes), u64, u32, meshlet_scopes, MAX_SCOPED_CGROUPS);

/* BPF_SK_STORAGE spelled out, because its macro has no way to name a pinned map: the VIP a
 * socket was sent to lives as long as the socket, so nothing has to clean it up. */
struct meshlet_origin_table_t {
    int key;
    struct conn_key leaf;
    void *(*sk_storage_get)(void *, void *, int);
    int (*sk_storage_delete)(void *);
    u32 flags;
};
__attribute__((section("maps/sk_storage" MESHLET_PINNED(meshlet_origin))))
struct meshlet_origin_table_t meshlet_origin = {.flags = BPF_F_NO_PREALLOC};
BPF_ANNOTATE_KV_PAIR(meshlet_origin, int, struct conn_key);

static __always_inline void count_connection(struct conn_key *key)
{
    u64 zero = 0;
    u64 *count = meshlet_conns.lookup_or_try_init(key, &zero);
    if (count)
        *count += 1;
}

/* The scope of the calling task: the first of its ancestor cgroups (the root's child first)
 * that the agent registered. Pods do not nest, so at most one matches. */
static __always_inline int caller_scope(u32 *scope)
{
#pragma unroll
    for (int level = 1; level <= MAX_CGROUP_DEPTH; level++) {
        u64 id = bpf_get_current_ancestor_cgroup_id(level);
        if (id == 0)
            return 0;
        u32 *found = meshlet_scopes.lookup(&id);
        if (found) {
            *scope = *found;
            return 1;
        }
    }
    return 0;
}

int meshlet_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SOCK_STREAM_TYPE) /* the split is of TCP connections; a UDP connect() is left alone */
        return 1;
    struct vip_key vip = {.ip = ctx->user_ip4, .port = bpf_ntohs((u16)ctx->user_port)};
    if (!caller_scope(&vip.scope))
        return 1;
    struct split *split = meshlet_vips.lookup(&vip);
    if (!split || split->total == 0)
        return 1;
    u32 pick = bpf_get_prandom_u32() % split->total;
    u32 chosen = MAX_BACKENDS;
#pragma unroll
    for (u32 i = 0; i < MAX_BACKENDS; i++) {
        if (i < split->count && pick < split->upto[i]) {
            chosen = i;
            break;
        }
    }
    if (chosen >= MAX_BACKENDS)
        return 1;
    struct conn_key conn = {.vip = vip, .backend_ip = split->ip[chosen], .backend_port = split->port[chosen]};
    ctx->user_ip4 = conn.backend_ip;
    ctx->user_port = bpf_htons((u16)conn.backend_port);
    int mark = BYPASS_MARK;
    bpf_setsockopt(ctx, SOL_SOCKET_LEVEL, SO_MARK_OPTION, &mark, sizeof(mark));
    struct conn_key *origin = meshlet_origin.sk_storage_get(ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (origin)
        *origin = conn;
    count_connection(&conn);
    return 1;
}

int meshlet_getpeername4(struct bpf_sock_addr *ctx)
{
    struct conn_key *origin = meshlet_origin.sk_storage_get(ctx->sk, 0, 0);
    if (!origin)
        return 1;
    if (ctx->user_ip4 != origin->backend_ip || bpf_ntohs((u16)ctx->user_port) != origin->backend_port)
        return 1;
    ctx->user_ip4 = origin->vip.ip;
    ctx->user_port = bpf_htons((u16)origin->vip.port);
    return 1;
}
