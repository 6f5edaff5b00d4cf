/* Retransmitted segments (tcp:tcp_retransmit_skb) on watched ports: a counter in slot 0. */
#include "meshlet_hist.h"

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    if (port_watched(args->dport))
        hist_add(METRIC_RETRANS, DIR_OUT, args->dport, 0, 1);
    if (port_watched(args->sport))
        hist_add(METRIC_RETRANS, DIR_IN, args->sport, 0, 1);
    return 0;
}
