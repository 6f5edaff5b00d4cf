/* Connection-level weighted split in the kernel (cgroup/connect4 + cgroup/getpeername4).
 *
 * connect4 sees every IPv4 connect() of the workload's cgroup: when the destination is a
 * virtual address (VIP) in meshlet_vips, it picks a backend by weight and rewrites the
 * destination before the SYN is built, so no proxy is in the path at all. The VIP is kept
 * in the socket's local storage, and getpeername4 puts it back into what the app sees,
 * as Cilium's socket-LB does, so the app never notices the rewrite.
 * A VIP's whole table is one hash value replaced by one update: a connect sees the old
 * weights or the new ones, never a mix (the map is not preallocated, so a replaced value
 * is freed only after readers are done with it).
 */
#include <uapi/linux/bpf.h>
#include "meshlet_pin.h"

#define SOCK_STREAM_TYPE 1

#ifndef MAX_VIPS
#define MAX_VIPS 256
#endif
#ifndef MAX_BACKENDS
#define MAX_BACKENDS 16
#endif
#ifndef MAX_COUNTERS
#define MAX_COUNTERS 4096
#endif

/* Addresses in network order (as user_ip4), ports in host order. */
struct vip_key {
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
    struct vip_key backend;
};

BPF_F_TABLE("hash" MESHLET_PINNED(meshlet_vips), struct vip_key, struct split, meshlet_vips, MAX_VIPS,
            BPF_F_NO_PREALLOC);
BPF_TABLE("percpu_hash" MESHLET_PINNED(meshlet_conns), struct conn_key, u64, meshlet_conns, MAX_COUNTERS);

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

int meshlet_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SOCK_STREAM_TYPE) /* the split is of TCP connections; a UDP connect() is left alone */
        return 1;
    struct vip_key vip = {.ip = ctx->user_ip4, .port = bpf_ntohs((u16)ctx->user_port)};
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
    struct conn_key conn = {.vip = vip, .backend = {.ip = split->ip[chosen], .port = split->port[chosen]}};
    ctx->user_ip4 = conn.backend.ip;
    ctx->user_port = bpf_htons((u16)conn.backend.port);
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
    if (ctx->user_ip4 != origin->backend.ip || bpf_ntohs((u16)ctx->user_port) != origin->backend.port)
        return 1;
    ctx->user_ip4 = origin->vip.ip;
    ctx->user_port = bpf_htons((u16)origin->vip.port);
    return 1;
}
