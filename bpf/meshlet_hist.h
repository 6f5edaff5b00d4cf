/* Log-linear (HDR-style) histogram shared by the TCP observation programs.
 *
 * A value v (microseconds) falls in slot:
 *   v < 2^HIST_SUB_BITS                    -> v            (exact slots)
 *   otherwise, e = floor(log2 v)           -> (e - HIST_SUB_BITS + 1) * 2^HIST_SUB_BITS
 *                                             + the HIST_SUB_BITS bits below the top bit
 * so every power of two is cut into 2^HIST_SUB_BITS equal slots (25% wide at 2 bits).
 * Values at or above 2^(HIST_MAX_EXP+1) share the last slot. The same arithmetic lives in
 * meshlet/ebpf/hist.py, which passes HIST_SUB_BITS and HIST_MAX_EXP here as -D flags so
 * the two sides cannot drift apart.
 */
#ifndef MESHLET_HIST_H
#define MESHLET_HIST_H

#ifndef HIST_SUB_BITS
#error "HIST_SUB_BITS comes from meshlet/ebpf/hist.py via cflags"
#endif
#ifndef HIST_MAX_EXP
#error "HIST_MAX_EXP comes from meshlet/ebpf/hist.py via cflags"
#endif
#ifndef MAX_PORTS
#define MAX_PORTS 64
#endif
#ifndef MAX_WORKLOAD_IPS
#define MAX_WORKLOAD_IPS 1024
#endif
#ifndef HIST_ENTRIES
#define HIST_ENTRIES 65536
#endif

#define HIST_SUB (1 << HIST_SUB_BITS)
#define HIST_SLOTS ((HIST_MAX_EXP - HIST_SUB_BITS + 2) * HIST_SUB)
#define HIST_SLOT_SUM HIST_SLOTS /* the sum of recorded values, for the Prometheus _sum */

#define METRIC_CONNLAT 0
#define METRIC_SRTT 1
#define METRIC_RETRANS 2

#define DIR_IN 0  /* the policy port is our local port (we serve it) */
#define DIR_OUT 1 /* the policy port is the remote port (we call it) */
#define AF_INET_FAMILY 2

struct hist_key {
    u8 metric;
    u8 direction;
    u16 port;     /* 0: a known workload's traffic on a port no policy names */
    u16 workload; /* the agent's tag of the socket's workload (namespace, name, QoS class); 0: none */
    u16 unused;
    u32 slot;
};

/* Ports named by policies: the agent fills it, every program filters on it first. */
BPF_HASH(ports, u16, u8, MAX_PORTS);
/* IPv4 addresses (network order) of the node's Pods -> their workload tag. A socket's own
 * (local) address says whose it is: a Pod's sockets live in its namespace, with its IP. */
BPF_HASH(workloads, u32, u16, MAX_WORKLOAD_IPS);
BPF_HASH(hist, struct hist_key, u64, HIST_ENTRIES);

static __always_inline u32 hist_log2(u64 v)
{
    u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) { r += 1; }
    return r;
}

static __always_inline u32 hist_slot(u64 v)
{
    if (v < HIST_SUB)
        return (u32)v;
    u32 e = hist_log2(v);
    if (e > HIST_MAX_EXP)
        return HIST_SLOTS - 1;
    u32 m = (u32)(v >> (e - HIST_SUB_BITS)) & (HIST_SUB - 1);
    return (e - HIST_SUB_BITS + 1) * HIST_SUB + m;
}

static __always_inline int port_watched(u16 port)
{
    return ports.lookup(&port) != NULL;
}

/* The workload tag of a local IPv4 address given as 4 bytes of a tracepoint's args (read with
 * a helper: the field may sit at an offset the verifier will not load a u32 from). */
static __always_inline u16 workload_of(const void *addr)
{
    u32 ip = 0;
    bpf_probe_read_kernel(&ip, sizeof(ip), addr);
    u16 *tag = workloads.lookup(&ip);
    return tag ? *tag : 0;
}

static __always_inline void hist_add(u8 metric, u8 direction, u16 port, u16 workload, u32 slot, u64 amount)
{
    struct hist_key key = {.metric = metric, .direction = direction, .port = port, .workload = workload,
                           .slot = slot};
    u64 zero = 0;
    u64 *count = hist.lookup_or_try_init(&key, &zero);
    if (count)
        __sync_fetch_and_add(count, amount);
}

/* One observation: one more value in its slot, and its size in the running sum. */
static __always_inline void hist_record(u8 metric, u8 direction, u16 port, u16 workload, u64 value_us)
{
    hist_add(metric, direction, port, workload, hist_slot(value_us), 1);
    hist_add(metric, direction, port, workload, HIST_SLOT_SUM, value_us);
}

/* Where one event counts: under each watched port at its end of the connection, or, on no
 * watched port, under port 0 when the socket belongs to a known workload. Returns how many. */
#define HIST_FOR_PORTS(dport, sport, workload, RECORD)                                                   \
    do {                                                                                                \
        int recorded = 0;                                                                               \
        if (port_watched(dport)) {                                                                      \
            RECORD(DIR_OUT, dport, workload);                                                           \
            recorded = 1;                                                                               \
        }                                                                                               \
        if (port_watched(sport)) {                                                                      \
            RECORD(DIR_IN, sport, workload);                                                            \
            recorded = 1;                                                                               \
        }                                                                                               \
        if (!recorded && (workload) != 0)                                                               \
            RECORD(DIR_OUT, 0, workload);                                                               \
    } while (0)

#endif /* MESHLET_HIST_H */
