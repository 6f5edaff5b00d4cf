/* tc clsact egress classifier (cls_bpf, direct-action): steers a packet into the HTB class of
 * its workload or of its TCP/UDP port by setting skb->priority to the class id (HTB reads
 * major:minor from it). The workload comes first: a Pod's IPv4 address (source, then
 * destination) in `pods` names the class its labels chose; packets forwarded from a Pod's
 * veth have no socket any more, but they still carry the Pod's address. Then the ports.
 * Unmapped packets keep their priority and fall into the HTB default class; the program never
 * drops or redirects, it always returns TC_ACT_OK.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#ifndef MAX_PORTS
#define MAX_PORTS 64
#endif
#ifndef MAX_PODS
#define MAX_PODS 1024
#endif

BPF_HASH(classes, u16, u32, MAX_PORTS); /* port -> HTB class id, e.g. 0x10010 for 1:10 */
BPF_HASH(pods, u32, u32, MAX_PODS);     /* Pod IPv4 (network order) -> HTB class id */

int classify(struct __sk_buff *skb)
{
    u8 proto;
    u32 l4;
    if (skb->protocol == htons(ETH_P_IP)) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
            return TC_ACT_OK;
        u32 *pod_class = pods.lookup(&ip.saddr);
        if (!pod_class)
            pod_class = pods.lookup(&ip.daddr);
        if (pod_class) {
            skb->priority = *pod_class;
            return TC_ACT_OK;
        }
        if (ip.frag_off & htons(0x1fff)) /* a later fragment: no ports to read */
            return TC_ACT_OK;
        proto = ip.protocol;
        l4 = ETH_HLEN + ip.ihl * 4;
    } else if (skb->protocol == htons(ETH_P_IPV6)) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
            return TC_ACT_OK;
        proto = ip6.nexthdr; /* extension headers are not followed: such packets stay default */
        l4 = ETH_HLEN + sizeof(ip6);
    } else {
        return TC_ACT_OK;
    }
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return TC_ACT_OK;
    __be16 ports[2]; /* source, destination: the same place in TCP and UDP */
    if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)) < 0)
        return TC_ACT_OK;
    u16 dport = ntohs(ports[1]);
    u16 sport = ntohs(ports[0]);
    u32 *class_id = classes.lookup(&dport);
    if (!class_id)
        class_id = classes.lookup(&sport);
    if (class_id)
        skb->priority = *class_id;
    return TC_ACT_OK;
}
