/* Smoothed RTT (tcp:tcp_probe, args->srtt in microseconds) of segments on watched ports or of
 * a known workload's sockets. args->saddr is a struct sockaddr: for AF_INET, sin_addr is at 4. */
#include "meshlet_hist.h"

#define SRTT_RECORD(direction, port, workload) hist_record(METRIC_SRTT, direction, port, workload, srtt)

TRACEPOINT_PROBE(tcp, tcp_probe)
{
    u32 srtt = args->srtt;
    if (srtt == 0)
        return 0;
    u16 workload = args->family == AF_INET_FAMILY ? workload_of((const u8 *)args->saddr + 4) : 0;
    HIST_FOR_PORTS(args->dport, args->sport, workload, SRTT_RECORD);
    return 0;
}
