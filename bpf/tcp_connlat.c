/* TCP connect latency: SYN_SENT -> ESTABLISHED of active opens to a watched port, or from a
 * known workload (recorded under port 0 when the port is not watched).
 * sock:inet_sock_set_state only: its args are stable, unlike struct sock on this kernel.
 */
#include "meshlet_hist.h"

#define ST_ESTABLISHED 1
#define ST_SYN_SENT 2
#define PROTO_TCP 6

BPF_HASH(connect_start, u64, u64, 16384); /* socket address -> SYN_SENT time (ns) */

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != PROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    u16 workload = args->family == AF_INET_FAMILY ? workload_of(args->saddr) : 0;
    if (args->newstate == ST_SYN_SENT) {
        if (!port_watched(args->dport) && workload == 0)
            return 0;
        u64 now = bpf_ktime_get_ns();
        connect_start.update(&sk, &now);
        return 0;
    }
    if (args->oldstate != ST_SYN_SENT)
        return 0;
    u64 *start = connect_start.lookup(&sk);
    if (!start)
        return 0;
    if (args->newstate == ST_ESTABLISHED) {
        u16 port = port_watched(args->dport) ? args->dport : 0;
        hist_record(METRIC_CONNLAT, DIR_OUT, port, workload, (bpf_ktime_get_ns() - *start) / 1000);
    }
    connect_start.delete(&sk);
    return 0;
}
