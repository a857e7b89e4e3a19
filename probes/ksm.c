/* dynvm-trace: KSM merges, COW breaks and guest-RAM discards on a stock kernel (bcc, tracepoints).
 *
 * Compiled by dynvm_trace/sources/ksm.py, which defines, from what the kernel has:
 *   PAGE_SHIFT_       log2 of the page size
 *   TASK_MM_OFF       offset of `mm` in struct task_struct (from BTF); -1 when unknown: then
 *                     processes in KSM before tracing began stay unresolved
 *   RMAP_ADDR_OFF     offset of `address` in struct ksm_rmap_item (from BTF); -1 when unknown:
 *                     then merges carry no address and COW breaks cannot be told apart
 *   HAVE_MERGE_ONE, HAVE_REMOVE_RMAP, HAVE_SCAN, HAVE_ENTER, HAVE_FAULT, HAVE_MADVISE,
 *   HAVE_FALLOCATE, HAVE_FORK    one per tracepoint that exists with the fields used
 *   RAW_<tracepoint>  attach that one's program raw: the kernel's BTF gives its arguments
 *                     (TP_PROTO) the types bpf_host.TRACEPOINTS lists, and the program reads
 *                     them by position. A raw program costs the traced task less (~80 ns per
 *                     event here: the kernel builds no trace record for it). Without it the
 *                     program attaches as a tracepoint and reads the format file's fields.
 *   STREAM            open the per-event ring buffer (trace/record); without it only the
 *                     in-kernel counters and histograms are kept
 *   TALLY             count events per (process, kind) in the kernel (top: no stream)
 *   RINGBUF_PAGES, MAX_PROCS, MAX_CHUNKS, MAX_RELEASE_CHUNKS, MAX_FDS, FD_MAPS   sizes
 *   PID_WORDS         u64 words of a bitmap of tgids: pid_max / 64, rounded up
 *
 * Which processes are tracked is asked on every user page fault of every process: two bitmaps
 * indexed by tgid (array lookups, inlined by the verifier) answer it, where a hash lookup cost
 * ~30 ns a fault. The kernel sets its bits (ksm_enter) and user space its own (processes in
 * KSM at start, qemu, --pid), so neither overwrites a word the other is changing.
 *
 * Page sets (merged pages, released pages) are bitmaps per (process, 2 MiB-aligned chunk of
 * 512 pages): bounded, and one lookup per fault.
 *
 * Punch holes (fallocate PUNCH_HOLE, what qemu does for file-, memfd- and hugetlbfs-backed
 * guest RAM) free a file range, not an address range. User space (dynvm_trace/ksm_fd_maps.py)
 * keeps `fd_maps`: for each (tracked tgid, fd), where the file that fd opens is mapped shared
 * in that process (up to FD_MAPS ranges of file offset, length, address; from /proc/PID/maps
 * and /proc/PID/fd, refreshed every interval). At the syscall's exit the punched range's whole
 * pages are translated through the first of those ranges (in file order) that holds any of
 * them, and that address range is marked released like a madvise discard, so its refaults are
 * seen. One range only: a hole across two mappings of the fd, or a file range mapped twice, is
 * not how guest RAM is laid out (mark_released takes ~31 k of the verifier's 1M instructions:
 * a second call would fit). Punched pages with no address (the fd has no known shared
 * mapping, or the part outside that one range) are counted in punch_untracked_pages. Files on
 * file systems with blocks larger than the page size (hugetlbfs) are left out of fd_maps by
 * user space: a huge page refaults with one fault, and the fault path counts one page per
 * fault.
 *
 * qemu discards file-backed guest RAM in host-sized pages with a punch hole and then a madvise
 * of the same addresses, in the same thread: one discard, two syscalls. A madvise discard that
 * lies within the addresses of its thread's last punch hole is that discard's second half: its
 * pages are marked again (no change), but it is no release of its own, only counted in
 * release_repeat (repeats_punch).
 */

#define CHUNK_PAGES 512
#define WORD_BITS 64
#define WORDS (CHUNK_PAGES / WORD_BITS)

/* counter indices: keep in step with COUNTERS in dynvm_trace/sources/ksm.py */
enum {
    C_MERGE_NEW, C_MERGE_EXISTING, C_MERGE_ZERO, C_MERGE_FAIL, C_UNMERGE, C_UNMERGE_AFTER_COW,
    C_SCAN_START, C_SCAN_END, C_ENTER, C_EXIT, C_COW, C_RELEASE, C_RELEASE_PAGES,
    C_RELEASE_UNTRACKED_PAGES, C_REFAULT, C_DROPPED, C_CHUNKS_FULL, C_UNRESOLVED_MM,
    C_TALLY_FULL, C_UNMERGE_AFTER_EXIT, C_PID_OUT_OF_RANGE, C_PUNCH_UNTRACKED_PAGES,
    C_RELEASE_REPEAT, N_COUNTERS
};

/* event kinds: keep in step with EVENT_KINDS in dynvm_trace/sources/ksm.py */
enum {
    E_MERGE_NEW, E_MERGE_EXISTING, E_MERGE_ZERO, E_MERGE_FAIL, E_UNMERGE, E_SCAN_START,
    E_SCAN_END, E_ENTER, E_EXIT, E_COW, E_RELEASE, E_REFAULT,
    E_RELEASE_PAGES  /* tallies only: pages of reclaim_release */
};

struct event {
    u64 ts;
    u64 mm;
    u64 pfn;   /* release: a punch hole's file offset */
    u64 addr;
    u64 arg;   /* err, seq, pages, rmap_entries */
    u64 arg2;  /* release: merged pages it unmapped; punch hole: 1 */
    u32 kind;
    u32 pid;
};

struct chunk_key {
    u32 pid;
    u32 pad;
    u64 chunk;  /* address >> (PAGE_SHIFT_ + 9) */
};

struct bits {
    u64 w[WORDS];
};

struct pending_discard {
    u64 start;
    u64 len;
    u32 punch;   /* fallocate(PUNCH_HOLE): a file range, not an address range */
    u32 fd;      /* punch hole: the file's fd */
    u32 repeat;  /* madvise: the second half of its thread's last punch hole (repeats_punch) */
    u32 pad;
};

BPF_PERCPU_ARRAY(counts, u64, N_COUNTERS);
BPF_HISTOGRAM(release_log2, int, 64);   /* pages per discard, log2 */
/* tgids whose faults and discards are watched: set by ksm_enter / by user space */
BPF_ARRAY(tracked_kernel, u64, PID_WORDS);
BPF_ARRAY(tracked_user, u64, PID_WORDS);
BPF_HASH(entered, u32, u8, MAX_PROCS);  /* tgids that entered KSM, until user space takes them */
/* tgids whose mm the fault probe has put in mm_pid (cleared at ksm_exit and, for pids that are
 * gone, by user space: a lost race only means learning once more) */
BPF_ARRAY(mm_known, u64, PID_WORDS);
/* A process's mm, as KSM knows it. With TALLY, its merges are counted here: a merge then costs
 * one hash lookup (the mm's), where a per-process tally took a second one (~25 ns). */
struct mm_info {
    u32 pid;  /* tgid */
    u32 pad;
    u64 merges[3];  /* by event kind: E_MERGE_NEW, E_MERGE_EXISTING, E_MERGE_ZERO */
};
BPF_HASH(mm_pid, u64, struct mm_info, MAX_PROCS);
#if defined(HAVE_FORK) && TASK_MM_OFF >= 0
#define FORK_ATTRIBUTION
/* Forking thread -> its child's mm. A fork of a KSM process enters the child's mm into KSM
 * from the parent (ksm_enter fires in the parent, before the child has a pid of its own);
 * sched_process_fork, in the same thread right after, names the child. LRU: a fork that
 * failed in between leaves an entry that goes in time. */
BPF_TABLE("lru_hash", u64, u64, forking, 4096);
#endif
/* mm -> tgid of processes that left KSM (ksm_exit): ksmd removes their rmap items later */
BPF_TABLE("lru_hash", u64, u32, exited_mm, MAX_PROCS);
BPF_HASH(merged, struct chunk_key, struct bits, MAX_CHUNKS);
BPF_HASH(released, struct chunk_key, struct bits, MAX_CHUNKS);
BPF_HASH(pending, u64, struct pending_discard, 4096);  /* thread -> discard in progress */
#ifdef HAVE_FALLOCATE
struct fd_key {
    u32 pid;
    u32 fd;
};

struct file_map {
    u64 offset;  /* bytes into the file, page-aligned */
    u64 len;     /* bytes; 0: unused */
    u64 start;   /* the address of `offset` */
};

struct fd_maps_val {
    struct file_map m[FD_MAPS];  /* in file offset order */
};

/* (tgid, fd) -> where that fd's file is mapped shared in the process: written by user space */
BPF_HASH(fd_maps, struct fd_key, struct fd_maps_val, MAX_FDS);

struct addr_range {
    u64 start;
    u64 end;
};

/* thread -> the addresses its last punch hole was translated to, until the thread's next
 * madvise discard (repeats_punch). LRU: a thread that punches and never madvises goes in time. */
BPF_TABLE("lru_hash", u64, struct addr_range, last_punch, 4096);
#endif
#ifdef STREAM
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#endif
#ifdef TALLY
struct tally_key {
    u32 pid;
    u32 kind;
};
BPF_PERCPU_HASH(tallies, struct tally_key, u64, MAX_PROCS);  /* (tgid, event kind) -> count */
#endif

static __always_inline void count(u32 idx, u64 n)
{
    u64 *v = counts.lookup(&idx);
    if (v)
        *v += n;
}

static __always_inline void tally(u32 kind, u32 pid, u64 n)
{
#ifdef TALLY
    struct tally_key key = {.pid = pid, .kind = kind};
    u64 zero = 0;
    u64 *v = tallies.lookup_or_try_init(&key, &zero);
    if (v)
        *v += n;
    else
        count(C_TALLY_FULL, 1);
#endif
}

/* Every event: into the stream (trace/record) and/or the per-process tallies (top). */
static __always_inline void emit(u32 kind, u32 pid, u64 mm, u64 pfn, u64 addr, u64 arg, u64 arg2)
{
#ifdef TALLY
    tally(kind, pid, 1);
    if (kind == E_RELEASE) {
        tally(E_RELEASE_PAGES, pid, arg);
        if (arg2 >> 1)
            tally(E_UNMERGE, pid, arg2 >> 1);  /* merged pages the discard unmapped */
    }
#endif
#ifdef STREAM
    struct event ev = {.ts = bpf_ktime_get_ns(), .mm = mm, .pfn = pfn, .addr = addr,
                       .arg = arg, .arg2 = arg2, .kind = kind, .pid = pid};
    if (events.ringbuf_output(&ev, sizeof(ev), BPF_RB_NO_WAKEUP) < 0)
        count(C_DROPPED, 1);
#endif
}

static __always_inline u32 current_tgid(void)
{
    return bpf_get_current_pid_tgid() >> 32;
}

static __always_inline int is_tracked(u32 pid)
{
    u32 word = pid / 64;
    u64 bit = 1ULL << (pid & 63);
    u64 *k = tracked_kernel.lookup(&word);
    u64 *u = tracked_user.lookup(&word);
    return (k && (*k & bit)) || (u && (*u & bit));
}

/* Track (set=1) or stop tracking a tgid on the kernel's side. */
static __always_inline void track_kernel(u32 pid, int set)
{
    u32 word = pid / 64;
    u64 bit = 1ULL << (pid & 63);
    u64 *k = tracked_kernel.lookup(&word);
    if (!k) {
        count(C_PID_OUT_OF_RANGE, 1);
        return;
    }
    if (set)
        __sync_fetch_and_or(k, bit);
    else
        __sync_fetch_and_and(k, ~bit);
}

#if TASK_MM_OFF >= 0
/* The current task's mm (current->mm, at its offset in BTF). */
static __always_inline u64 current_mm(void)
{
    u64 mm = 0;
    bpf_probe_read_kernel(&mm, sizeof(mm), (char *)bpf_get_current_task() + TASK_MM_OFF);
    return mm;
}
#endif

static __always_inline u32 pid_of_mm(u64 mm)
{
    struct mm_info *info = mm_pid.lookup(&mm);
    return info ? info->pid : 0;
}

/* mm belongs to tgid pid (keeps the counts of a known mm). */
static __always_inline void set_mm_pid(u64 mm, u32 pid)
{
    struct mm_info *info = mm_pid.lookup(&mm);
    if (info) {
        info->pid = pid;
        return;
    }
    struct mm_info fresh = {.pid = pid};
    mm_pid.update(&mm, &fresh);
}

static __always_inline u64 rmap_address(void *rmap_item)
{
#if RMAP_ADDR_OFF >= 0
    u64 addr = 0;
    bpf_probe_read_kernel(&addr, sizeof(addr), (char *)rmap_item + RMAP_ADDR_OFF);
    return addr & ~((1ULL << PAGE_SHIFT_) - 1);
#else
    return 0;
#endif
}

enum { MERGED, RELEASED };

/* The bitmap chunk of a page set (MERGED or RELEASED) for key, created when `create`. */
static __always_inline struct bits *chunk_of(int set_id, struct chunk_key *key, int create)
{
    struct bits *b = set_id == MERGED ? merged.lookup(key) : released.lookup(key);
    if (b || !create)
        return b;
    struct bits zero = {};
    if (set_id == MERGED) {
        merged.insert(key, &zero);
        b = merged.lookup(key);
    } else {
        released.insert(key, &zero);
        b = released.lookup(key);
    }
    if (!b)
        count(C_CHUNKS_FULL, 1);
    return b;
}

/* Set (set=1) or clear the bit of one page in a page set; returns whether it was set before. */
static __always_inline int page_bit(int set_id, u32 pid, u64 addr, int set)
{
    struct chunk_key key = {.pid = pid, .chunk = addr >> (PAGE_SHIFT_ + 9)};
    u32 page = (addr >> PAGE_SHIFT_) & (CHUNK_PAGES - 1);
    u64 mask = 1ULL << (page & (WORD_BITS - 1));
    struct bits *b = chunk_of(set_id, &key, set);
    u32 w = page / WORD_BITS;
    if (!b || w >= WORDS)
        return 0;
    u64 old = set ? __sync_fetch_and_or(&b->w[w], mask) : __sync_fetch_and_and(&b->w[w], ~mask);
    return (old & mask) != 0;
}

static __always_inline void on_merge(u32 kind, u64 mm, u64 pfn, void *rmap_item)
{
    struct mm_info *info = mm_pid.lookup(&mm);
    u32 pid = info ? info->pid : 0;
    u64 addr = rmap_address(rmap_item);
    /* an mm in mm_pid is a tracked process's (ksm_enter tracks it, learn_mm learns only tracked
     * ones, ksm_exit removes it): no tracked-bitmap test here, ~10 ns a merge */
    if (!pid)
        count(C_UNRESOLVED_MM, 1);
    else if (addr && kind != E_MERGE_ZERO)
        page_bit(MERGED, pid, addr, 1);
    count(kind == E_MERGE_NEW ? C_MERGE_NEW : kind == E_MERGE_EXISTING ? C_MERGE_EXISTING
          : C_MERGE_ZERO, 1);
#ifdef TALLY
    if (info)
        info->merges[kind] += 1;  /* no lock prefix: ksmd, one thread, is the only merger */
    else
        tally(kind, pid, 1);
#else
    emit(kind, pid, mm, pfn, addr, 0, 0);
#endif
}

/* Every program below comes in two ways of attaching: raw (RAW_<tracepoint>: arguments by
 * position, in TP_PROTO's order) or as a tracepoint (fields by name); both call one handler. */

static __always_inline int merge_event(int zero_page, u64 ksm_page, u64 pfn, void *rmap_item,
                                       u64 mm, int err)
{
    if (err) {
        count(C_MERGE_FAIL, 1);
        emit(E_MERGE_FAIL, pid_of_mm(mm), mm, pfn, rmap_address(rmap_item), (u64)(s64)err,
             zero_page);
        return 0;
    }
    on_merge(zero_page ? E_MERGE_ZERO : ksm_page ? E_MERGE_EXISTING : E_MERGE_NEW, mm, pfn,
             rmap_item);
    return 0;
}

#ifdef RAW_ksm_merge_with_ksm_page
RAW_TRACEPOINT_PROBE(ksm_merge_with_ksm_page)  /* (ksm_page, pfn, rmap_item, mm, err) */
{
    return merge_event(0, ctx->args[0], ctx->args[1], (void *)ctx->args[2], ctx->args[3],
                       (int)ctx->args[4]);
}
#else
TRACEPOINT_PROBE(ksm, ksm_merge_with_ksm_page)
{
    return merge_event(0, (u64)args->ksm_page, args->pfn, args->rmap_item, (u64)args->mm,
                       args->err);
}
#endif

#ifdef HAVE_MERGE_ONE
/* Only the use_zero_pages path: an empty page mapped to the zero page. */
#ifdef RAW_ksm_merge_one_page
RAW_TRACEPOINT_PROBE(ksm_merge_one_page)  /* (pfn, rmap_item, mm, err) */
{
    return merge_event(1, 0, ctx->args[0], (void *)ctx->args[1], ctx->args[2], (int)ctx->args[3]);
}
#else
TRACEPOINT_PROBE(ksm, ksm_merge_one_page)
{
    return merge_event(1, 0, args->pfn, args->rmap_item, (u64)args->mm, args->err);
}
#endif
#endif

#ifdef HAVE_REMOVE_RMAP
/* Fires when a KSM page's stable node goes away with mappings still listed: for a page whose
 * COW break we already saw, that is the kernel catching up, not a new unmerge. */
static __always_inline int remove_rmap_event(u64 pfn, void *rmap_item, u64 mm)
{
    u32 pid = pid_of_mm(mm);
    u64 addr = rmap_address(rmap_item);
    if (!pid) {
        /* A process that exited: while it is still tracked its page set decides (a page
         * still merged is an unmerge, and leaves the set vm_exit counts); once the reader
         * dropped it, its vm_exit record has counted its merged pages already. */
        u32 *gone = exited_mm.lookup(&mm);
        if (gone) {
            pid = *gone;
            if (!is_tracked(pid)) {
                count(C_UNMERGE_AFTER_EXIT, 1);
                return 0;
            }
        }
    }
    if (pid && addr && is_tracked(pid) && !page_bit(MERGED, pid, addr, 0)) {
        count(C_UNMERGE_AFTER_COW, 1);
        return 0;
    }
    count(C_UNMERGE, 1);
    emit(E_UNMERGE, pid, mm, pfn, addr, 0, 0);
    return 0;
}

#ifdef RAW_ksm_remove_rmap_item
RAW_TRACEPOINT_PROBE(ksm_remove_rmap_item)  /* (pfn, rmap_item, mm) */
{
    return remove_rmap_event(ctx->args[0], (void *)ctx->args[1], ctx->args[2]);
}
#else
TRACEPOINT_PROBE(ksm, ksm_remove_rmap_item)
{
    return remove_rmap_event(args->pfn, args->rmap_item, (u64)args->mm);
}
#endif
#endif

#ifdef HAVE_SCAN
static __always_inline int scan_event(u32 counter, u32 kind, int seq, u32 rmap_entries)
{
    count(counter, 1);
    emit(kind, 0, 0, 0, 0, seq, rmap_entries);
    return 0;
}

#ifdef RAW_ksm_start_scan
RAW_TRACEPOINT_PROBE(ksm_start_scan)  /* (seq, rmap_entries) */
{
    return scan_event(C_SCAN_START, E_SCAN_START, (int)ctx->args[0], (u32)ctx->args[1]);
}
#else
TRACEPOINT_PROBE(ksm, ksm_start_scan)
{
    return scan_event(C_SCAN_START, E_SCAN_START, args->seq, args->rmap_entries);
}
#endif

#ifdef RAW_ksm_stop_scan
RAW_TRACEPOINT_PROBE(ksm_stop_scan)  /* (seq, rmap_entries) */
{
    return scan_event(C_SCAN_END, E_SCAN_END, (int)ctx->args[0], (u32)ctx->args[1]);
}
#else
TRACEPOINT_PROBE(ksm, ksm_stop_scan)
{
    return scan_event(C_SCAN_END, E_SCAN_END, args->seq, args->rmap_entries);
}
#endif
#endif

#ifdef HAVE_ENTER
/* mm enters KSM for tgid pid. */
static __always_inline int enter_event(u64 mm, u32 pid)
{
    u8 one = 1;
    set_mm_pid(mm, pid);
    exited_mm.delete(&mm);  /* a new mm at a freed one's address */
    track_kernel(pid, 1);
    entered.update(&pid, &one);
    count(C_ENTER, 1);
    emit(E_ENTER, pid, mm, 0, 0, 0, 0);
    return 0;
}

/* ksm_enter: madvise(MADV_MERGEABLE) and prctl(PR_SET_MEMORY_MERGE) enter in the process
 * itself. A fork of a KSM process enters the child's mm from the parent: that mm is not the
 * current task's, and its process is named at sched_process_fork (without FORK_ATTRIBUTION it
 * is attributed to the parent). */
static __always_inline int ksm_enter_event(u64 mm)
{
#ifdef FORK_ATTRIBUTION
    if (current_mm() != mm) {
        u64 tid = bpf_get_current_pid_tgid();
        forking.update(&tid, &mm);
        return 0;
    }
#endif
    return enter_event(mm, current_tgid());
}

static __always_inline int exit_event(u64 mm)
{
    struct mm_info *info = mm_pid.lookup(&mm);
    u32 pid = info ? info->pid : 0;
#ifdef TALLY
    if (info) {  /* its merge counts go with it: into the process's tallies */
        for (int k = E_MERGE_NEW; k <= E_MERGE_ZERO; k++)
            if (info->merges[k])
                tally(k, pid, info->merges[k]);
    }
#endif
    mm_pid.delete(&mm);
    if (pid) {
        exited_mm.update(&mm, &pid);
        track_kernel(pid, 0);
        u32 word = pid / 64;
        u64 *known = mm_known.lookup(&word);
        if (known)
            __sync_fetch_and_and(known, ~(1ULL << (pid & 63)));
    }
    count(C_EXIT, 1);
    emit(E_EXIT, pid, mm, 0, 0, 0, 0);
    return 0;
}

#ifdef RAW_ksm_enter
RAW_TRACEPOINT_PROBE(ksm_enter)  /* (mm) */
{
    return ksm_enter_event(ctx->args[0]);
}
#else
TRACEPOINT_PROBE(ksm, ksm_enter)
{
    return ksm_enter_event((u64)args->mm);
}
#endif

#ifdef RAW_ksm_exit
RAW_TRACEPOINT_PROBE(ksm_exit)  /* (mm) */
{
    return exit_event(ctx->args[0]);
}
#else
TRACEPOINT_PROBE(ksm, ksm_exit)
{
    return exit_event((u64)args->mm);
}
#endif

#ifdef FORK_ATTRIBUTION
/* Every fork and clone: one lookup, a hit only right after a KSM process forked. */
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u64 tid = bpf_get_current_pid_tgid();
    u64 *mm = forking.lookup(&tid);
    if (!mm)
        return 0;
    u64 child_mm = *mm;
    forking.delete(&tid);
    return enter_event(child_mm, args->child_pid);
}
#endif
#endif

#ifdef HAVE_FAULT
/* A tracked process that entered KSM before we attached: its mm is learnt at its first page
 * fault (ksm_enter told us the others'). One bit test per fault once known. */
static __always_inline void learn_mm(u32 pid)
{
#if TASK_MM_OFF >= 0
    u32 word = pid / 64;
    u64 bit = 1ULL << (pid & 63);
    u64 *known = mm_known.lookup(&word);
    if (!known || (*known & bit))
        return;
    u64 mm = current_mm();
    if (mm)
        set_mm_pid(mm, pid);
    __sync_fetch_and_or(known, bit);
#endif
}

/* error_code bits (x86): 0 protection violation (page present), 1 write, 2 user mode. */
static __always_inline int fault_event(u64 address, u64 error_code)
{
    u32 pid = current_tgid();
    if (!is_tracked(pid))
        return 0;
    learn_mm(pid);
    u64 addr = address & ~((1ULL << PAGE_SHIFT_) - 1);
    if ((error_code & 3) == 3 && page_bit(MERGED, pid, addr, 0)) {
        count(C_COW, 1);
        emit(E_COW, pid, 0, 0, addr, 0, 0);
        return 0;
    }
    if (page_bit(RELEASED, pid, addr, 0)) {
        count(C_REFAULT, 1);
        emit(E_REFAULT, pid, 0, 0, addr, 1, 0);
    }
    return 0;
}

#ifdef RAW_page_fault_user
RAW_TRACEPOINT_PROBE(page_fault_user)  /* (address, regs, error_code) */
{
    return fault_event(ctx->args[0], ctx->args[2]);
}
#else
TRACEPOINT_PROBE(exceptions, page_fault_user)
{
    return fault_event(args->address, args->error_code);
}
#endif
#endif

#ifdef HAVE_FALLOCATE
/* Whether a madvise discard of [start, start + len) by thread tid is the second half of the
 * thread's last punch hole: qemu's ram_block_discard_range discards file-backed guest RAM in
 * pages of the host's size with fallocate(PUNCH_HOLE) of the file and then, in the same thread,
 * madvise(MADV_DONTNEED) of where that range is mapped; the second is not another release of
 * those pages. It is when its range lies within the addresses the punch hole was translated to
 * (remember_punch). The thread's next madvise discard takes the punch hole: forgotten either
 * way. */
static __always_inline u32 repeats_punch(u64 tid, u64 start, u64 len)
{
    struct addr_range *r = last_punch.lookup(&tid);
    if (!r)
        return 0;
    /* madvise rounds len up to whole pages; r->end is page-aligned, so the unrounded end will do */
    u32 within = start >= r->start && start + len <= r->end;
    last_punch.delete(&tid);
    return within;
}

/* Thread tid's punch hole was translated to [start, end): remembered until the thread's next
 * madvise discard (repeats_punch). An empty range (no addresses) forgets the last one. */
static __always_inline void remember_punch(u64 tid, u64 start, u64 end)
{
    if (end > start) {
        struct addr_range r = {.start = start, .end = end};
        last_punch.update(&tid, &r);
    } else {
        last_punch.delete(&tid);
    }
}
#endif

/* At a discard syscall's entry: what to finish at its exit. Whether a madvise repeats a punch
 * hole is decided here, at the entry (it moved here when the exit programs had no verifier
 * budget to spare; the repeat is the same whichever end of the syscall decides it). */
static __always_inline void stash(u64 start, u64 len, u32 punch, u32 fd)
{
    u32 pid = current_tgid();
    if (!is_tracked(pid))
        return;
    u64 tid = bpf_get_current_pid_tgid();
    struct pending_discard d = {.start = start, .len = len, .punch = punch, .fd = fd};
#ifdef HAVE_FALLOCATE
    if (!punch)
        d.repeat = repeats_punch(tid, start, len);
#endif
    pending.update(&tid, &d);
}

/* Mark pages lo..hi (inclusive, within the chunk) of one 512-page chunk as released and no
 * longer merged; returns how many of them were merged. */
static __always_inline u64 mark_chunk(u32 pid, u64 chunk, u64 lo, u64 hi)
{
    struct chunk_key key = {.pid = pid, .chunk = chunk};
    struct bits *r = chunk_of(RELEASED, &key, 1);
    struct bits *m = chunk_of(MERGED, &key, 0);
    u64 unmerged = 0;
    if (!r) {
        count(C_RELEASE_UNTRACKED_PAGES, hi - lo + 1);
        return 0;
    }
    for (int w = 0; w < WORDS; w++) {
        u64 wlo = w * WORD_BITS, whi = wlo + WORD_BITS - 1;
        if (whi < lo || wlo > hi)
            continue;
        u64 a = lo > wlo ? lo - wlo : 0;
        u64 b = hi < whi ? hi - wlo : WORD_BITS - 1;
        u64 mask = (b == WORD_BITS - 1 ? ~0ULL : ((1ULL << (b + 1)) - 1)) & ~((1ULL << a) - 1);
        __sync_fetch_and_or(&r->w[w], mask);
        if (m) {
            u64 old = __sync_fetch_and_and(&m->w[w], ~mask);
            unmerged += __builtin_popcountll(old & mask);
        }
    }
    return unmerged;
}

/* Mark a discarded address range as released (and no longer merged), a 512-page chunk at a
 * time; returns how many merged pages it unmapped. Chunks beyond MAX_RELEASE_CHUNKS are
 * counted as untracked (their refaults are not seen): the loop is unrolled by the verifier,
 * and bcc cannot pass bpf_loop a callback. Only the first and the last chunk can be partial:
 * the chunks between are marked whole, with page bounds the verifier knows, so it walks the
 * word loop's branches for two chunks, not for every one (775 k processed instructions for
 * the discard exit programs when every chunk had unknown bounds). */
static __always_inline u64 mark_released(u32 pid, u64 start, u64 end)
{
    u64 first = start >> (PAGE_SHIFT_ + 9);
    u64 last = (end - 1) >> (PAGE_SHIFT_ + 9);
    u64 lo = (start >> PAGE_SHIFT_) & (CHUNK_PAGES - 1);
    u64 hi = ((end - 1) >> PAGE_SHIFT_) & (CHUNK_PAGES - 1);
    if (first == last)
        return mark_chunk(pid, first, lo, hi);
    u64 unmerged = mark_chunk(pid, first, lo, CHUNK_PAGES - 1);
    for (int i = 1; i < MAX_RELEASE_CHUNKS; i++) {
        if (first + i >= last)
            break;
        unmerged += mark_chunk(pid, first + i, 0, CHUNK_PAGES - 1);
    }
    if (last - first < MAX_RELEASE_CHUNKS)
        unmerged += mark_chunk(pid, last, 0, hi);
    else
        count(C_RELEASE_UNTRACKED_PAGES,
              (end - ((first + MAX_RELEASE_CHUNKS) << (PAGE_SHIFT_ + 9))) >> PAGE_SHIFT_);
    return unmerged;
}

#ifdef HAVE_FALLOCATE
/* Where the whole pages of a punched file range [off, off + len) of fd are mapped in process
 * pid: the address range [*start, returned end) within the first of the fd's shared mappings
 * (fd_maps) that holds any of them; returns 0 when none does. */
static __always_inline u64 punched_range(u32 pid, u32 fd, u64 off, u64 len, u64 *start)
{
    struct fd_key key = {.pid = pid, .fd = fd};
    struct fd_maps_val *v = fd_maps.lookup(&key);
    if (!v)
        return 0;
    u64 page_mask = (1ULL << PAGE_SHIFT_) - 1;
    u64 lo = (off + page_mask) & ~page_mask, hi = (off + len) & ~page_mask;
    for (int i = 0; i < FD_MAPS; i++) {
        u64 m_off = v->m[i].offset, m_end = m_off + v->m[i].len;
        u64 a = lo > m_off ? lo : m_off;
        u64 b = hi < m_end ? hi : m_end;
        if (a < b) {
            *start = v->m[i].start + (a - m_off);
            return v->m[i].start + (b - m_off);
        }
    }
    return 0;
}
#endif

static __always_inline void finish_discard(long ret)
{
    u64 tid = bpf_get_current_pid_tgid();
    struct pending_discard *d = pending.lookup(&tid);
    if (!d)
        return;
    struct pending_discard copy = *d;
    pending.delete(&tid);
    if (ret != 0 || copy.len == 0)
        return;
    u32 pid = tid >> 32;
    u64 pages = (copy.len + (1ULL << PAGE_SHIFT_) - 1) >> PAGE_SHIFT_;
    u64 start = copy.start, end = copy.start + copy.len, offset = 0;
#ifdef HAVE_FALLOCATE
    if (copy.punch) {
        offset = copy.start;
        start = 0;
        end = punched_range(pid, copy.fd, copy.start, copy.len, &start);
        remember_punch(tid, start, end);
        u64 mapped = end > start ? (end - start) >> PAGE_SHIFT_ : 0;
        if (pages > mapped)
            count(C_PUNCH_UNTRACKED_PAGES, pages - mapped);
    }
#endif
    /* one call site: the verifier walks mark_released once per program. A repeat is marked
     * too (setting bits already set); it unmaps no merged page: a punch hole's range is a shared
     * file mapping, where KSM merges nothing. */
    u64 unmerged = end > start ? mark_released(pid, start, end) : 0;
    if (copy.repeat) {
        count(C_RELEASE_REPEAT, 1);
        return;
    }
    count(C_RELEASE, 1);
    count(C_RELEASE_PAGES, pages);
    release_log2.increment(bpf_log2l(pages));
    emit(E_RELEASE, pid, 0, offset, end > start ? start : 0, pages,
         copy.punch | (unmerged << 1));
}

#ifdef HAVE_MADVISE
TRACEPOINT_PROBE(syscalls, sys_enter_madvise)
{
    if (args->behavior == 4 /* MADV_DONTNEED */ || args->behavior == 9 /* MADV_REMOVE */)
        stash(args->start, args->len_in, 0, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_madvise)
{
    finish_discard(args->ret);
    return 0;
}
#endif

#ifdef HAVE_FALLOCATE
TRACEPOINT_PROBE(syscalls, sys_enter_fallocate)
{
    if (args->mode & 0x02 /* FALLOC_FL_PUNCH_HOLE */)
        stash(args->offset, args->len, 1, args->fd);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_fallocate)
{
    finish_discard(args->ret);
    return 0;
}
#endif
