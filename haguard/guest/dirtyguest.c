/*
 * haguard's test guest: a multiboot kernel that dirties memory at a set rate.
 *
 * It boots straight from `qemu-system-x86_64 -kernel dirtyguest.elf` and reads
 * its settings from the command line (`-append "mib=64 rate=100"`):
 *   mib=N   size of the region it rewrites, in MiB (default 64)
 *   rate=N  pages rewritten per second, in MiB/s; 0 = idle, -1 = as fast as it can
 * Every visit to a page first checks the value left by the previous visit, so a
 * migration that loses or corrupts a page shows up in `errors`.  The status block
 * at physical address STATUS_ADDR lets a host read the guest's progress over QMP
 * (`human-monitor-command xp`): a counter that keeps counting across a migration
 * proves the guest moved rather than restarted.
 */
typedef unsigned int u32;
typedef unsigned long long u64;

#define STATUS_ADDR 0x7000u
#define REGION_START 0x1000000u /* 16 MiB, above the kernel image */
#define PAGE 4096u

struct __attribute__((packed)) status {
    u32 magic;        /* 0x44474148 "HAGD" once running */
    u32 version;
    u64 ms;           /* milliseconds since boot, from the calibrated TSC */
    u64 loops;        /* main-loop iterations */
    u64 pages;        /* page writes so far */
    u64 errors;       /* pages that did not hold the value written last pass */
    u64 passes;       /* completed sweeps over the region */
    u32 region_mib;
    int rate_mib;
    u64 tsc_khz;
};

__attribute__((section(".multiboot"), used, aligned(4)))
static const u32 multiboot_header[3] = {0x1BADB002u, 0x0u, (u32)-(0x1BADB002u + 0x0u)};

unsigned char stack[16384] __attribute__((aligned(16), used));
void kmain(u32 magic, u32 *info);

__asm__(
    ".globl _start\n"
    "_start:\n"
    "  mov $stack+16384, %esp\n"
    "  push %ebx\n"
    "  push %eax\n"
    "  call kmain\n"
    "1: hlt\n"
    "  jmp 1b\n");

static inline void outb(unsigned short port, unsigned char v) { __asm__ volatile("outb %0,%1" ::"a"(v), "Nd"(port)); }
static inline unsigned char inb(unsigned short port) { unsigned char v; __asm__ volatile("inb %1,%0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }

static void puts_serial(const char *s) {
    for (; *s; s++) {
        while (!(inb(0x3fd) & 0x20)) {}
        outb(0x3f8, (unsigned char)*s);
    }
}

static void put_dec(u64 v) {
    char buf[24]; int i = 23; buf[i] = 0;
    do { buf[--i] = (char)('0' + (int)(v % 10)); v /= 10; } while (v && i);
    puts_serial(&buf[i]);
}

/* 64-bit division helpers without libgcc: only small divisors are used. */
static u64 udiv(u64 n, u64 d) {
    u64 q = 0, r = 0;
    for (int i = 63; i >= 0; i--) {
        r = (r << 1) | ((n >> i) & 1);
        if (r >= d) { r -= d; q |= (u64)1 << i; }
    }
    return q;
}

/* TSC ticks per ms, measured against PIT channel 2 over 10 ms. */
static u64 calibrate_tsc_khz(void) {
    const u32 pit_hz = 1193182, ticks = pit_hz / 100; /* 10 ms */
    outb(0x61, (unsigned char)((inb(0x61) & ~0x02) | 0x01)); /* gate on, speaker off */
    outb(0x43, 0xB0);                                      /* ch2, lo/hi, mode 0 */
    outb(0x42, (unsigned char)(ticks & 0xff));
    outb(0x42, (unsigned char)(ticks >> 8));
    u64 t0 = rdtsc();
    while (!(inb(0x61) & 0x20)) {}
    u64 t1 = rdtsc();
    u64 khz = udiv(t1 - t0, 10);
    return khz ? khz : 1000000;
}

static int parse_int(const char *cmd, const char *key, int dflt) {
    for (const char *p = cmd; p && *p; p++) {
        if (p != cmd && p[-1] != ' ') continue;
        const char *k = key, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (*k || *q != '=') continue;
        q++;
        int neg = 0, v = 0;
        if (*q == '-') { neg = 1; q++; }
        while (*q >= '0' && *q <= '9') v = v * 10 + (*q++ - '0');
        return neg ? -v : v;
    }
    return dflt;
}

void kmain(u32 magic, u32 *info) {
    volatile struct status *st = (volatile struct status *)STATUS_ADDR;
    const char *cmd = 0;
    u32 mem_upper_kib = 0;
    if (magic == 0x2BADB002u && info) {
        if (info[0] & 0x4) cmd = (const char *)info[4];
        if (info[0] & 0x1) mem_upper_kib = info[2];
    }
    int mib = parse_int(cmd, "mib", 64);
    int rate = parse_int(cmd, "rate", 0);
    u32 avail_mib = mem_upper_kib / 1024;
    if (avail_mib > 16 + 1 && (u32)mib > avail_mib - 17) mib = (int)(avail_mib - 17);
    if (mib < 1) mib = 1;
    u32 npages = (u32)mib * 256u;

    u64 khz = calibrate_tsc_khz();
    st->version = 1; st->ms = 0; st->loops = 0; st->pages = 0; st->errors = 0; st->passes = 0;
    st->region_mib = (u32)mib; st->rate_mib = rate; st->tsc_khz = khz;

    /* First sweep: pass 0 everywhere, so later checks have something to compare. */
    for (u32 i = 0; i < npages; i++) *(volatile u32 *)(REGION_START + i * PAGE) = 0;
    st->magic = 0x44474148u;
    puts_serial("haguard-guest ready mib="); put_dec((u64)mib);
    puts_serial(" rate="); put_dec((u64)(rate < 0 ? 0 : rate)); puts_serial("\n");

    u64 start = rdtsc(), next_ms_tsc = start + khz, ms = 0;
    u32 idx = 0, pass = 1;
    /* Pages per ms at the requested rate (256 pages per MiB). Fractions carry over. */
    u64 budget_x1000 = 0;
    for (;;) {
        u64 now = rdtsc();
        if (now >= next_ms_tsc) {
            u64 elapsed = udiv(now - start, khz);
            if (rate > 0) budget_x1000 += (elapsed - ms) * (u64)rate * 256u;
            ms = elapsed;
            st->ms = ms;
            next_ms_tsc = start + (ms + 1) * khz;
        }
        u32 todo;
        if (rate < 0) todo = 64;
        else if (budget_x1000 >= 1000) { todo = (u32)udiv(budget_x1000, 1000); budget_x1000 -= (u64)todo * 1000; }
        else todo = 0;
        for (u32 n = 0; n < todo; n++) {
            volatile u32 *w = (volatile u32 *)(REGION_START + idx * PAGE);
            if (*w != pass - 1) st->errors++;
            *w = pass;
            st->pages++;
            if (++idx == npages) { idx = 0; pass++; st->passes++; }
        }
        st->loops++;
        if (!todo) __asm__ volatile("pause");
    }
}
