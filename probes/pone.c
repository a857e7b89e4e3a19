/* dynvm-trace: the patched Linux 4.4.1 kernel (Dynamic VM: pone page merge, ppr free page
 * reclaim), traced with kprobes and kretprobes (bcc). See kernel/pone.md for the probe points.
 *
 * Only what Linux 4.4 BPF offers: kprobe programs, BPF_HASH / BPF_ARRAY / BPF_PERF_OUTPUT,
 * the helpers map_lookup/update/delete, probe_read, ktime_get_ns, get_current_pid_tgid,
 * get_current_comm, perf_event_output. No loops, no bpf-to-bpf calls (every helper function is
 * always_inline), no direct kernel memory reads (every read is an explicit bpf_probe_read, so
 * bcc's rewriter has nothing to turn into bpf_probe_read_kernel), no atomic whose result is
 * used (only XADD exists). On 4.4 the stack a helper reads or writes must be initialised
 * first: every such buffer is zeroed.
 *
 * Compiled by dynvm_trace/sources/pone.py, which defines:
 *   HAVE_<SYMBOL>         one per probe point attached (e.g. HAVE_CHANGE_REVERSE_REF); the
 *                         programs of a missing point are left out
 *   RELEASE_MERGE_PAGE    address of the kernel's `release_merge_page` pointer (kallsyms);
 *                         0: unknown, refaults are not recognised
 *   VMEMMAP_BASE          where struct page array starts (4.4 x86-64: fixed 0xffffea0000000000)
 *   QEMU_COMM0/1, SPDEAMON_COMM0/1   the comms "qemu-system-x86" and "spdeamon" as two
 *                         little-endian u64 words each (zero padded to 16 bytes)
 *   MAX_THREADS, MAX_MMS  map sizes
 */

#include <linux/mm_types.h>

/* in-kernel counters, the totals: keep in step with COUNTERS in dynvm_trace/sources/pone.py */
enum {
    C_MERGE, C_MERGE_FAIL_REF, C_MERGE_FAIL_TREE, C_MERGE_FAIL_WP, C_TREE_NEW, C_TREE_DUP,
    C_COW, C_UNMERGE, C_RELEASE, C_RELEASE_RETRY, C_RELEASE_FAIL, C_REFAULT,
    C_RELEASED_UNMAPPED, C_SCAN, C_POOL_REG, C_POOL_REG_FAIL, C_VM_EXIT, C_GUEST_MARK,
    C_GUEST_MARK_FAIL, C_GUEST_ALLOC, C_UNRESOLVED_MM, C_STASH_FULL, N_COUNTERS
};

/* event kinds: keep in step with E_* in dynvm_trace/sources/pone.py */
enum {
    E_MERGE = 1, E_MERGE_FAIL, E_COW, E_UNMERGE, E_RELEASE, E_REFAULT, E_SCAN_START,
    E_SCAN_END, E_POOL_REG, E_VM_EXIT, E_GUEST_MARK
};

/* merge_fail stages */
enum { STAGE_CHANGE_REF = 1, STAGE_TREE_INSERT, STAGE_WRITE_PROTECT };

/* One perf buffer record: 56 bytes, no padding: RAW_EVENT in dynvm_trace/sources/pone.py. */
struct event {
    u64 ts;
    u64 pfn;   /* merge: kept pfn; cow: old pfn; fail, release: pfn; guest mark: guest pfn */
    u64 pfn2;  /* merge: old (freed) pfn; cow: new pfn */
    u64 addr;  /* host virtual address in the qemu process; 0 unknown */
    s64 code;  /* merge_fail: kernel return; release: 0/1/2; scan_end: msleep ms; guest: ret */
    u32 kind;
    u32 pid;   /* the qemu process (tgid) the event concerns; 0 unknown */
    u32 tid;   /* the thread the probe ran in */
    u32 aux;   /* merge_fail: stage; scan: sequence number */
};

/* A qemu thread's current page fault: COW breaks and refaults are recognised from the calls
 * the fault makes (can_reuse == 1, then dec_mapcount(old) / alloc(new) / delete_sd_tree), in
 * whatever order they come. Reset at every handle_mm_fault entry of the thread. */
struct fault {
    u64 addr;
    u64 old_page;
    u64 new_page;
    u32 flags;
    u32 pad;
};
#define F_REUSE 1   /* pone_slice_can_reuse returned 1: a write to a pone page */
#define F_SHARED 2  /* delete_sd_tree left sharers: the page was merged */
#define F_DONE 4    /* the event of this fault was emitted */

/* Arguments kept from a function's entry for its return, per thread and function. */
struct stash_key {
    u32 tid;
    u32 fn;
};
enum { S_REF_OLD = 1, S_REF_NEW, S_REF_MM, S_REF_ADDR, S_TREE_PFN, S_WP_PFN, S_DEL_PFN,
       S_RELEASE_PAGE, S_POOL_MM, S_GUEST_PAGE };

BPF_ARRAY(counts, u64, N_COUNTERS);
BPF_HASH(mm_pid, u64, u32, MAX_MMS);            /* mm of a qemu process -> its tgid */
BPF_HASH(faults, u32, struct fault, MAX_THREADS);
BPF_HASH(stash, struct stash_key, u64, MAX_THREADS);
BPF_PERF_OUTPUT(events);

#define PAGE_MASK_ (~((u64)4095))

static __always_inline void count(u32 idx)
{
    u64 *v = counts.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline u64 pfn_of(u64 page)
{
    return (page - VMEMMAP_BASE) / sizeof(struct page);
}

static __always_inline u32 current_tid(void)
{
    return (u32)bpf_get_current_pid_tgid();
}

static __always_inline u32 current_tgid(void)
{
    return bpf_get_current_pid_tgid() >> 32;
}

static __always_inline int comm_is(u64 w0, u64 w1)
{
    u64 comm[2] = {0, 0};
    bpf_get_current_comm(comm, sizeof(comm));
    return comm[0] == w0 && comm[1] == w1;
}

static __always_inline u32 pid_of_mm(u64 mm)
{
    u32 *pid = mm_pid.lookup(&mm);
    if (pid)
        return *pid;
    count(C_UNRESOLVED_MM);
    return 0;
}

static __always_inline void put(u32 fn, u64 value)
{
    struct stash_key key = {.tid = current_tid(), .fn = fn};
    if (stash.update(&key, &value))
        count(C_STASH_FULL);
}

/* The value kept at entry (0 when none), removed. */
static __always_inline u64 take(u32 fn)
{
    struct stash_key key = {.tid = current_tid(), .fn = fn};
    u64 *v = stash.lookup(&key);
    u64 out = 0;
    if (v) {
        out = *v;
        stash.delete(&key);
    }
    return out;
}

static __always_inline void emit(struct pt_regs *ctx, u32 kind, u32 pid, u64 pfn, u64 pfn2,
                                 u64 addr, s64 code, u32 aux)
{
    struct event ev = {};
    ev.ts = bpf_ktime_get_ns();
    ev.pfn = pfn;
    ev.pfn2 = pfn2;
    ev.addr = addr;
    ev.code = code;
    ev.kind = kind;
    ev.pid = pid;
    ev.tid = current_tid();
    ev.aux = aux;
    events.perf_submit(ctx, &ev, sizeof(ev));
}

/* ---- VM attribution: mm -> qemu process, and the current fault of each qemu thread ---- */

#ifdef HAVE_HANDLE_MM_FAULT
/* 4.4: int handle_mm_fault(struct mm_struct *mm, struct vm_area_struct *vma,
 *                          unsigned long address, unsigned int flags) */
int on_handle_mm_fault(struct pt_regs *ctx)
{
    if (!comm_is(QEMU_COMM0, QEMU_COMM1))
        return 0;
    u64 mm = PT_REGS_PARM1(ctx);
    if (!mm_pid.lookup(&mm)) {
        u32 pid = current_tgid();
        mm_pid.update(&mm, &pid);
    }
    u32 tid = current_tid();
    u64 addr = PT_REGS_PARM3(ctx) & PAGE_MASK_;
    struct fault *f = faults.lookup(&tid);
    if (f) {
        f->addr = addr;
        f->old_page = 0;
        f->new_page = 0;
        f->flags = 0;
    } else {
        struct fault fresh = {};
        fresh.addr = addr;
        faults.update(&tid, &fresh);
    }
    return 0;
}
#endif

/* ---- merges (spthrd_* workers) ---- */

#ifdef HAVE_CHANGE_REVERSE_REF
/* int change_reverse_ref(unsigned long old_pfn, unsigned long new_pfn) */
int on_change_reverse_ref(struct pt_regs *ctx)
{
    put(S_REF_OLD, PT_REGS_PARM1(ctx));
    put(S_REF_NEW, PT_REGS_PARM2(ctx));
    return 0;
}

int on_change_reverse_ref_ret(struct pt_regs *ctx)
{
    u64 old_pfn = take(S_REF_OLD);
    u64 new_pfn = take(S_REF_NEW);
    u64 mm = take(S_REF_MM);
    u64 addr = take(S_REF_ADDR);
    s64 ret = (int)PT_REGS_RC(ctx);
    u32 pid = mm ? pid_of_mm(mm) : 0;
    if (ret == 0) {
        count(C_MERGE);
        emit(ctx, E_MERGE, pid, new_pfn, old_pfn, addr, 0, 0);
    } else {
        count(C_MERGE_FAIL_REF);
        emit(ctx, E_MERGE_FAIL, pid, old_pfn, new_pfn, addr, ret, STAGE_CHANGE_REF);
    }
    return 0;
}
#endif

#ifdef HAVE_CHANGE_REVERSE_REF_ONE
/* int change_reverse_ref_one(struct page *old, struct vm_area_struct *vma,
 *                            unsigned long addr, void *new_page) */
int on_change_reverse_ref_one(struct pt_regs *ctx)
{
    u64 mm = 0;
    bpf_probe_read(&mm, sizeof(mm),
                   (char *)PT_REGS_PARM2(ctx) + offsetof(struct vm_area_struct, vm_mm));
    put(S_REF_MM, mm);
    put(S_REF_ADDR, PT_REGS_PARM3(ctx) & PAGE_MASK_);
    return 0;
}
#endif

#ifdef HAVE_INSERT_SD_TREE
/* struct page *insert_sd_tree(unsigned long pfn): NULL error, the page itself new content,
 * another page the duplicate found */
int on_insert_sd_tree(struct pt_regs *ctx)
{
    put(S_TREE_PFN, PT_REGS_PARM1(ctx));
    return 0;
}

int on_insert_sd_tree_ret(struct pt_regs *ctx)
{
    u64 pfn = take(S_TREE_PFN);
    u64 ret = PT_REGS_RC(ctx);
    if (ret == 0) {
        count(C_MERGE_FAIL_TREE);
        emit(ctx, E_MERGE_FAIL, 0, pfn, 0, 0, 0, STAGE_TREE_INSERT);
    } else if (pfn_of(ret) == pfn) {
        count(C_TREE_NEW);
    } else {
        count(C_TREE_DUP);
    }
    return 0;
}
#endif

#ifdef HAVE_MAKE_SLICE_WPROTECT
/* int make_slice_wprotect(unsigned long pfn) */
int on_make_slice_wprotect(struct pt_regs *ctx)
{
    put(S_WP_PFN, PT_REGS_PARM1(ctx));
    return 0;
}

int on_make_slice_wprotect_ret(struct pt_regs *ctx)
{
    u64 pfn = take(S_WP_PFN);
    s64 ret = (int)PT_REGS_RC(ctx);
    if (ret != 0) {
        count(C_MERGE_FAIL_WP);
        emit(ctx, E_MERGE_FAIL, 0, pfn, 0, 0, ret, STAGE_WRITE_PROTECT);
    }
    return 0;
}
#endif

/* ---- COW breaks, unmerges and refaults (the faulting qemu thread) ---- */

static __always_inline struct fault *qemu_fault(void)
{
    if (!comm_is(QEMU_COMM0, QEMU_COMM1))
        return 0;
    u32 tid = current_tid();
    return faults.lookup(&tid);
}

/* Emit the COW break once the fault has shown all of it: a write to a pone page, the page
 * still shared by others, the old page unmapped and the new one tracked. */
static __always_inline void cow_done(struct pt_regs *ctx, struct fault *f)
{
    if (f->flags != (F_REUSE | F_SHARED) || !f->old_page || !f->new_page)
        return;
    f->flags |= F_DONE;
    count(C_COW);
    emit(ctx, E_COW, current_tgid(), pfn_of(f->old_page), pfn_of(f->new_page), f->addr, 0, 0);
}

#ifdef HAVE_PONE_SLICE_CAN_REUSE
/* int pone_slice_can_reuse(struct page *page): 1 = must copy (a pone page) */
int on_pone_slice_can_reuse_ret(struct pt_regs *ctx)
{
    if ((int)PT_REGS_RC(ctx) != 1)
        return 0;
    struct fault *f = qemu_fault();
    if (f)
        f->flags = F_REUSE;
    return 0;
}
#endif

#ifdef HAVE_PONE_SLICE_DEC_MAPCOUNT_PROCESS
/* void pone_slice_dec_mapcount_process(struct page *page): a mapping of a tracked page went
 * away. In a COW fault it is the old page; the kernel's release_merge_page is the page every
 * released guest page maps, so a write fault leaving it is a refault, and leaving it outside
 * a fault is a released page unmapped (munmap, exit). */
int on_pone_slice_dec_mapcount_process(struct pt_regs *ctx)
{
    struct fault *f = qemu_fault();
    if (!f)
        return 0;
    u64 page = PT_REGS_PARM1(ctx);
    u64 released = 0;
#if RELEASE_MERGE_PAGE
    bpf_probe_read(&released, sizeof(released), (void *)RELEASE_MERGE_PAGE);
#endif
    if (released && page == released) {
        if (f->flags == F_REUSE) {
            f->flags |= F_DONE;
            count(C_REFAULT);
            emit(ctx, E_REFAULT, current_tgid(), 0, 0, f->addr, 0, 0);
        } else {
            count(C_RELEASED_UNMAPPED);
        }
        return 0;
    }
    if (f->flags & F_REUSE && !f->old_page) {
        f->old_page = page;
        cow_done(ctx, f);
    }
    return 0;
}
#endif

#ifdef HAVE_PONE_SLICE_ALLOC_PROCESS
/* int pone_slice_alloc_process(struct page *page): every anonymous page the host allocates
 * comes here (before pone's own comm filter); only the new page of a COW fault is used. */
int on_pone_slice_alloc_process(struct pt_regs *ctx)
{
    struct fault *f = qemu_fault();
    if (!f || !(f->flags & F_REUSE) || f->new_page)
        return 0;
    f->new_page = PT_REGS_PARM1(ctx);
    cow_done(ctx, f);
    return 0;
}
#endif

#ifdef HAVE_DELETE_SD_TREE
/* int delete_sd_tree(unsigned long pfn, int op): returns the sharers left. In a COW fault
 * that is the COW break's (counted there); anywhere else a merged mapping was removed. */
int on_delete_sd_tree(struct pt_regs *ctx)
{
    put(S_DEL_PFN, PT_REGS_PARM1(ctx));
    return 0;
}

int on_delete_sd_tree_ret(struct pt_regs *ctx)
{
    u64 pfn = take(S_DEL_PFN);
    if ((int)PT_REGS_RC(ctx) <= 0)
        return 0;
    struct fault *f = qemu_fault();
    if (f && f->flags == F_REUSE) {
        f->flags |= F_SHARED;
        cow_done(ctx, f);
        return 0;
    }
    count(C_UNMERGE);
    emit(ctx, E_UNMERGE, f ? current_tgid() : 0, pfn, 0, 0, 0, 0);
    return 0;
}
#endif

/* ---- ppr, host side ---- */

#ifdef HAVE_PROCESS_VIRT_PAGE_RELEASE
/* int process_virt_page_release(void *page_mem, struct page *org): 0 released, 1 retry,
 * 2 failed */
int on_process_virt_page_release(struct pt_regs *ctx)
{
    put(S_RELEASE_PAGE, PT_REGS_PARM2(ctx));
    return 0;
}

int on_process_virt_page_release_ret(struct pt_regs *ctx)
{
    u64 page = take(S_RELEASE_PAGE);
    s64 ret = (int)PT_REGS_RC(ctx);
    count(ret == 0 ? C_RELEASE : ret == 1 ? C_RELEASE_RETRY : C_RELEASE_FAIL);
    emit(ctx, E_RELEASE, 0, page ? pfn_of(page) : 0, 0, 0, ret, 0);
    return 0;
}
#endif

#ifdef HAVE_MEM_POOL_REG
/* int mem_pool_reg(unsigned long gfn, struct kvm *kvm, struct mm_struct *mm,
 *                  struct task_struct *task): the VM ioctl 0xAE49, in the qemu process */
int on_mem_pool_reg(struct pt_regs *ctx)
{
    put(S_POOL_MM, PT_REGS_PARM3(ctx));
    return 0;
}

int on_mem_pool_reg_ret(struct pt_regs *ctx)
{
    u64 mm = take(S_POOL_MM);
    s64 ret = (int)PT_REGS_RC(ctx);
    u32 pid = current_tgid();
    if (ret != 0) {
        count(C_POOL_REG_FAIL);
        return 0;
    }
    if (mm)
        mm_pid.update(&mm, &pid);
    count(C_POOL_REG);
    emit(ctx, E_POOL_REG, pid, 0, 0, 0, 0, 0);
    return 0;
}
#endif

#ifdef HAVE_DELETE_MM_IN_POOL
/* void delete_mm_in_pool(struct mm_struct *mm): an mm goes away; a qemu one is a VM exit */
int on_delete_mm_in_pool(struct pt_regs *ctx)
{
    u64 mm = PT_REGS_PARM1(ctx);
    u32 *pid = mm_pid.lookup(&mm);
    if (!pid)
        return 0;
    u32 tgid = *pid;
    mm_pid.delete(&mm);
    count(C_VM_EXIT);
    emit(ctx, E_VM_EXIT, tgid, 0, 0, 0, 0, 0);
    return 0;
}
#endif

/* ---- the scan daemon: one msleep per 5 s base cycle ---- */

#ifdef HAVE_MSLEEP
/* void msleep(unsigned int msecs): spdeamon sleeps 5000 - (cost of the cycle) ms */
int on_msleep(struct pt_regs *ctx)
{
    if (!comm_is(SPDEAMON_COMM0, SPDEAMON_COMM1))
        return 0;
    u32 idx = C_SCAN;
    u64 *seq = counts.lookup(&idx);
    emit(ctx, E_SCAN_END, 0, 0, 0, 0, (u32)PT_REGS_PARM1(ctx), seq ? (u32)*seq : 0);
    return 0;
}

int on_msleep_ret(struct pt_regs *ctx)
{
    if (!comm_is(SPDEAMON_COMM0, SPDEAMON_COMM1))
        return 0;
    u32 idx = C_SCAN;
    u64 *seq = counts.lookup(&idx);
    if (!seq)
        return 0;
    __sync_fetch_and_add(seq, 1);
    emit(ctx, E_SCAN_START, 0, 0, 0, 0, 0, (u32)*seq);
    return 0;
}
#endif

/* ---- ppr, guest side (a guest kernel with CONFIG_PPR_MODULE) ---- */

#ifdef HAVE_VIRT_MARK_PAGE_RELEASE
/* int virt_mark_page_release(struct page *page): 0 marked for the host, -1 not (no pool) */
int on_virt_mark_page_release(struct pt_regs *ctx)
{
    put(S_GUEST_PAGE, PT_REGS_PARM1(ctx));
    return 0;
}

int on_virt_mark_page_release_ret(struct pt_regs *ctx)
{
    u64 page = take(S_GUEST_PAGE);
    s64 ret = (int)PT_REGS_RC(ctx);
    count(ret == 0 ? C_GUEST_MARK : C_GUEST_MARK_FAIL);
    emit(ctx, E_GUEST_MARK, 0, page ? pfn_of(page) : 0, 0, 0, ret, 0);
    return 0;
}
#endif

#ifdef HAVE_VIRT_MARK_PAGE_ALLOC
/* void virt_mark_page_alloc(struct page *page): a guest page allocated again (counted) */
int on_virt_mark_page_alloc(struct pt_regs *ctx)
{
    count(C_GUEST_ALLOC);
    return 0;
}
#endif
