/*
 * sysprobe: run inside the nspawn machine, it checks that the syscall filter
 * lets bpf(2) and perf_event_open(2) through (eBPF CNIs need both) and that
 * /sys/fs/bpf is a bpf file system objects can be pinned in.
 *
 *   sysprobe PIN_PATH   creates an array map, pins it at PIN_PATH, opens a
 *                       software perf event; prints one line per check and
 *                       exits non-zero when any fails.
 * Built static so it runs in any rootfs: gcc -static -O2 -o sysprobe sysprobe.c
 */
#include <errno.h>
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static long sys_bpf(int cmd, union bpf_attr *attr)
{
	return syscall(SYS_bpf, cmd, attr, sizeof(*attr));
}

int main(int argc, char **argv)
{
	int failed = 0;
	if (argc != 2) {
		fprintf(stderr, "usage: %s PIN_PATH\n", argv[0]);
		return 2;
	}

	union bpf_attr attr;
	memset(&attr, 0, sizeof(attr));
	attr.map_type = BPF_MAP_TYPE_ARRAY;
	attr.key_size = 4;
	attr.value_size = 4;
	attr.max_entries = 1;
	long fd = sys_bpf(BPF_MAP_CREATE, &attr);
	if (fd < 0) {
		printf("bpf: map create failed: %s\n", strerror(errno));
		failed = 1;
	} else {
		printf("bpf: map create ok\n");
		memset(&attr, 0, sizeof(attr));
		attr.pathname = (uint64_t)(uintptr_t)argv[1];
		attr.bpf_fd = (uint32_t)fd;
		if (sys_bpf(BPF_OBJ_PIN, &attr) < 0) {
			printf("bpf: pin at %s failed: %s\n", argv[1], strerror(errno));
			failed = 1;
		} else {
			printf("bpf: pinned at %s\n", argv[1]);
		}
	}

	struct perf_event_attr pe;
	memset(&pe, 0, sizeof(pe));
	pe.type = PERF_TYPE_SOFTWARE;
	pe.size = sizeof(pe);
	pe.config = PERF_COUNT_SW_CPU_CLOCK;
	pe.disabled = 1;
	long pfd = syscall(SYS_perf_event_open, &pe, 0, -1, -1, 0);
	if (pfd < 0) {
		printf("perf_event_open: failed: %s\n", strerror(errno));
		failed = 1;
	} else {
		printf("perf_event_open: ok\n");
	}
	return failed;
}
