/* Retransmitted segments (tcp:tcp_retransmit_skb) on watched ports or of a known workload's
 * sockets: a counter in slot 0. */
#include "meshlet_hist.h"

#define RETRANS_RECORD(direction, port, workload) hist_add(METRIC_RETRANS, direction, port, workload, 0, 1)

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    u16 workload = args->family == AF_INET_FAMILY ? workload_of(args->saddr) : 0;
    HIST_FOR_PORTS(args->dport, args->sport, workload, RETRANS_RECORD);
    return 0;
}
