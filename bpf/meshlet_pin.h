/* Maps that survive the agent: after a restart (even after kill -9) the agent compiles with
 * -DMESHLET_PIN_DIR="/sys/fs/bpf/meshlet/<set>-<cgroup id>", and bcc then opens each map
 * pinned there (the path after ':' in a map's section) instead of creating a new one, so
 * live sockets, weights and counters carry over. Without the flag (a first start) the maps
 * are created and meshlet/ebpf/hooks.py pins them.
 */
#ifndef MESHLET_PIN_H
#define MESHLET_PIN_H

#ifdef MESHLET_PIN_DIR
#define MESHLET_PINNED(name) ":" MESHLET_PIN_DIR "/" #name
#else
#define MESHLET_PINNED(name) ""
#endif

#endif
