/* Smoothed RTT (tcp:tcp_probe, args->srtt in microseconds) of segments on watched ports. */
#include "meshlet_hist.h"

TRACEPOINT_PROBE(tcp, tcp_probe)
{
    u32 srtt = args->srtt;
    if (srtt == 0)
        return 0;
    if (port_watched(args->dport))
        hist_record(METRIC_SRTT, DIR_OUT, args->dport, srtt);
    if (port_watched(args->sport))
        hist_record(METRIC_SRTT, DIR_IN, args->sport, srtt);
    return 0;
}
