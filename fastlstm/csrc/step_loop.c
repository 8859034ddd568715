/* The CPU step loops' time loops (fastlstm/reference.py), whole: every step's recurrent product and its pointwise
 * work (fused_step.c), shared between threads by sequence or by hidden unit (share_of), one call for all T steps.
 * Built and loaded by fastlstm/fused_step.py, which says when these run.
 *
 * Why a product of its own. Each step multiplies a few rows by the same weight: [B, H] by W_hh^T [H, 4H] forward,
 * [B, 4H] by W_hh [4H, H] backward. Through PyTorch that is one BLAS call per step, a few microseconds of dispatch
 * and a GEMM that handles a short matrix poorly (its threads split the rows, of which there are few), after which
 * the pointwise work runs on one thread. Here each thread owns some of the sequences, which it runs through every
 * step on its own, or, when W_hh is too large for each thread to read all of it every step, a slice of the hidden
 * units: per step it computes its units' columns of the product (for all four gates), then their pointwise work,
 * and then waits once for the others, whose h_t (forward) or gate gradients (backward) the next step's product reads
 * in full.
 *
 * The threads are OpenMP's, and so PyTorch's own: its CPU wheels ship libgomp, which a library built with -fopenmp
 * binds to once PyTorch has loaded it (one soname). Threads of our own lost to them: after every parallel PyTorch op
 * its pool spins for milliseconds waiting for the next one, on the cores our threads needed (on 2 cores, input 32,
 * hidden 128, batch 32, 100 steps, a training pass took 1.29x the time of the per-step BLAS loop with threads of our
 * own, and 0.66x with PyTorch's pool made to sleep at once, OMP_WAIT_POLICY=PASSIVE). Built without OpenMP (a
 * compiler without it), the loops run on the calling thread. */

#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fused_step.h"

#if defined(__AVX512F__)
#define VEC 16
#elif defined(__AVX__)
#define VEC 8
#else
#define VEC 4 /* SSE, NEON */
#endif
/* The product's register tile: TILE_ROWS rows by two vectors of columns, 2 * TILE_ROWS accumulators (12 of the 16
 * vector registers of AVX2), enough independent FMAs in flight to cover their latency. */
#define TILE_ROWS 6
#define TILE_COLUMNS (2 * VEC)
#define MAX_THREADS 256
/* Polls of the step barrier before a waiting thread yields its core: a step takes microseconds, so a wait is
 * normally over within the spin; a thread whose partner was descheduled (more threads than free cores) yields
 * instead of burning the core the partner needs. */
#define SPINS_BEFORE_YIELD 4096

typedef float vfloat __attribute__((vector_size(VEC * sizeof(float))));

static inline vfloat load(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v); /* an unaligned vector load */
    return v;
}

static inline void store(float *p, vfloat v) { memcpy(p, &v, sizeof v); }

/* x in every lane: x - 0 is x for every float, so this compiles to one broadcast. */
static inline vfloat splat(float x) { return x - (vfloat){0}; }

/* out[r, 0:TILE_COLUMNS] = sum_k a[r, k] w[k, ...] + addend[r, ...] (0 without one) for r < rows. `rows` is a
 * constant at every call (tile_rows), so the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(const float *restrict a, int64_t lda, const float *restrict w,
                                                       int64_t ldw, int64_t depth, const float *addend, float *out,
                                                       int64_t ldo, const int rows) {
    vfloat low[TILE_ROWS], high[TILE_ROWS];
    for (int r = 0; r < rows; r++) {
        low[r] = high[r] = (vfloat){0};
        /* The addend is added last and fetched now: loaded first, its cache misses (a fresh step's rows of the input
         * projection) would stall every accumulator before its first FMA. */
        if (addend) {
            __builtin_prefetch(addend + r * ldo);
            __builtin_prefetch(addend + r * ldo + TILE_COLUMNS - 1);
        }
    }
    for (int64_t k = 0; k < depth; k++) {
        vfloat w_low = load(w + k * ldw), w_high = load(w + k * ldw + VEC);
        for (int r = 0; r < rows; r++) {
            vfloat x = splat(a[r * lda + k]);
            low[r] += x * w_low;
            high[r] += x * w_high;
        }
    }
    for (int r = 0; r < rows; r++) {
        if (addend) {
            low[r] += load(addend + r * ldo);
            high[r] += load(addend + r * ldo + VEC);
        }
        store(out + r * ldo, low[r]);
        store(out + r * ldo + VEC, high[r]);
    }
}

static void tile_rows(const float *a, int64_t lda, const float *w, int64_t ldw, int64_t depth, const float *addend,
                      float *out, int64_t ldo, int rows) {
    switch (rows) {
    case 6:
        tile(a, lda, w, ldw, depth, addend, out, ldo, 6);
        break;
    case 5:
        tile(a, lda, w, ldw, depth, addend, out, ldo, 5);
        break;
    case 4:
        tile(a, lda, w, ldw, depth, addend, out, ldo, 4);
        break;
    case 3:
        tile(a, lda, w, ldw, depth, addend, out, ldo, 3);
        break;
    case 2:
        tile(a, lda, w, ldw, depth, addend, out, ldo, 2);
        break;
    default:
        tile(a, lda, w, ldw, depth, addend, out, ldo, 1);
    }
}

/* The weight of a loop's products, [depth, *] row-major (`plain`, rows `ldw` apart), as `blocks` blocks of
 * `block_width` columns (the forward's four gates; the backward's one), and a copy in which each whole tile of
 * TILE_COLUMNS columns of a block is contiguous, its `depth` rows one after another. Read from the plain layout a
 * tile's rows lie `ldw` floats apart, a page or more for 256 units and beyond: every row a TLB entry and the end of
 * the hardware prefetcher's stream. The copy is made once a loop, and read once a step. */
typedef struct {
    const float *plain;
    float *tiles;
    int64_t ldw, depth, block_width, tiles_per_block;
} packed_weight;

static int pack_weight(packed_weight *w, const float *plain, int64_t ldw, int64_t depth, int blocks,
                       int64_t block_width) {
    *w = (packed_weight){plain, NULL, ldw, depth, block_width, block_width / TILE_COLUMNS};
    const size_t tile_floats = (size_t)(depth * TILE_COLUMNS);
    if (w->tiles_per_block == 0)
        return 0;
    w->tiles = malloc((size_t)(blocks * w->tiles_per_block) * tile_floats * sizeof(float));
    if (w->tiles == NULL)
        return -1;
    for (int block = 0; block < blocks; block++)
        for (int64_t j = 0; j < w->tiles_per_block; j++) {
            float *tile = w->tiles + (size_t)(block * w->tiles_per_block + j) * tile_floats;
            const float *source = plain + block * block_width + j * TILE_COLUMNS;
            for (int64_t k = 0; k < depth; k++)
                memcpy(tile + k * TILE_COLUMNS, source + k * ldw, TILE_COLUMNS * sizeof(float));
        }
    return 0;
}

/* out[b, c] = addend[b, c] (0 without one) + sum_k a[b, k] w[k, c] for every row b < batch and column c of block
 * `block` in [first, end) (first a multiple of TILE_COLUMNS): a [batch, depth] (rows lda apart), addend and out (ldo,
 * pointing at the block's column 0; they may be the same). Whole tiles of columns from the packed copy, each over
 * the rows in blocks of at most TILE_ROWS (spread evenly: 8 rows are 4 + 4, not 6 + 2), which reuse the tile's
 * weight from L1; the columns past the last whole tile one at a time from the plain layout. */
static void product(const float *a, int64_t lda, const packed_weight *w, int block, const float *addend, float *out,
                    int64_t ldo, int64_t batch, int64_t first, int64_t end) {
    const int64_t blocks = (batch + TILE_ROWS - 1) / TILE_ROWS, depth = w->depth;
    int64_t c = first;
    for (; c + TILE_COLUMNS <= end; c += TILE_COLUMNS) {
        const float *tile = w->tiles + (block * w->tiles_per_block + c / TILE_COLUMNS) * depth * TILE_COLUMNS;
        for (int64_t row_block = 0, b = 0; row_block < blocks; row_block++) {
            const int rows = (int)(batch / blocks + (row_block < batch % blocks));
            tile_rows(a + b * lda, lda, tile, TILE_COLUMNS, depth, addend ? addend + b * ldo + c : NULL,
                      out + b * ldo + c, ldo, rows);
            b += rows;
        }
    }
    const float *plain = w->plain + block * w->block_width;
    for (; c < end; c++)
        for (int64_t b = 0; b < batch; b++) {
            float sum = addend ? addend[b * ldo + c] : 0.0f;
            for (int64_t k = 0; k < depth; k++)
                sum += a[b * lda + k] * plain[k * w->ldw + c];
            out[b * ldo + c] = sum;
        }
}

/* ---- the team of threads and its step barrier ---- */

typedef struct {
    atomic_int arrived;
    atomic_int generation;
} step_barrier;

static void barrier_wait(step_barrier *barrier, int parties) {
    if (parties == 1)
        return;
    const int generation = atomic_load_explicit(&barrier->generation, memory_order_acquire);
    if (atomic_fetch_add_explicit(&barrier->arrived, 1, memory_order_acq_rel) == parties - 1) {
        atomic_store_explicit(&barrier->arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&barrier->generation, 1, memory_order_release);
        return;
    }
    int spins = 0;
    while (atomic_load_explicit(&barrier->generation, memory_order_acquire) == generation)
        if (++spins == SPINS_BEFORE_YIELD) {
            sched_yield();
            spins = 0;
        }
}

/* How a loop is shared. By sequence (rows of the batch): each thread runs its own sequences through every step, with
 * nothing to wait for, but each reads all of W_hh every step, so only while W_hh stays in its core's cache. By hidden
 * unit otherwise: each thread reads its slice of W_hh, and the threads wait for each other once a step. */
typedef struct {
    int by_rows;
    int64_t row_first, row_end, unit_first, unit_end;
} share;

/* W_hh's float32 bytes up to which the loops split by sequence: half a MiB, the L2 of a core on most x86 parts this
 * runs on (AMD Zen 2 and 3, Intel's client cores; more on newer servers): 181 units or fewer split by sequence. */
#define ROW_SPLIT_MAX_WEIGHT_BYTES (512 * 1024)

static int split_by_rows(int64_t batch, int64_t units) {
    return batch > 1 && 16 * units * units <= ROW_SPLIT_MAX_WEIGHT_BYTES;
}

/* Thread `part` of `parts`' share: its sequences, or its units in whole column tiles, as evenly as they go. */
static share share_of(int64_t batch, int64_t units, int part, int parts) {
    share mine = {split_by_rows(batch, units), 0, batch, 0, units};
    if (mine.by_rows) {
        mine.row_first = batch * part / parts;
        mine.row_end = batch * (part + 1) / parts;
        return mine;
    }
    const int64_t tiles = (units + TILE_COLUMNS - 1) / TILE_COLUMNS;
    const int64_t begin = tiles * part / parts, stop = tiles * (part + 1) / parts;
    mine.unit_first = begin * TILE_COLUMNS < units ? begin * TILE_COLUMNS : units;
    mine.unit_end = stop * TILE_COLUMNS < units ? stop * TILE_COLUMNS : units;
    return mine;
}

/* Threads to use: no more than asked, than MAX_THREADS, or than there are sequences or column tiles to share. */
static int team_size(int64_t threads, int64_t batch, int64_t units) {
    const int64_t shares = split_by_rows(batch, units) ? batch : (units + TILE_COLUMNS - 1) / TILE_COLUMNS;
    int64_t n = threads < shares ? threads : shares;
    n = n < MAX_THREADS ? n : MAX_THREADS;
    return n < 1 ? 1 : (int)n;
}

/* Runs body(loop, part, parts) on every thread of a team of at most `size` (OpenMP may grant fewer; the body splits
 * the work by what it was granted) and returns how many there were. */
static int run_team(void (*body)(void *, int, int), void *loop, int size) {
    int granted = 1;
    if (size == 1) { /* the calling thread alone: no parallel region to enter */
        body(loop, 0, 1);
        return 1;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(size)
    {
        const int parts = omp_get_num_threads();
        if (omp_get_thread_num() == 0)
            granted = parts;
        body(loop, omp_get_thread_num(), parts);
    }
#else
    (void)size;
    body(loop, 0, 1);
#endif
    return granted;
}

/* ---- forward ---- */

typedef struct forward_partial forward_partial;

typedef struct {
    packed_weight w_t; /* [H, 4H]: W_hh^T with the candidate's columns doubled, four blocks of H */
    float *pre;       /* [T, B, 4H]: the input projection; each step adds h_{t-1} W_hh^T in place */
    const float *h0, *c0;
    float *gates, *cells, *hidden;
    int64_t steps, batch, units, reverse;
    const forward_stats *stats; /* thread 0's reductions (the caller's), or NULL */
    forward_partial *partials;  /* those of threads 1, 2, ... */
    step_barrier barrier;
} forward_loop;

static const forward_stats *partial_forward_stats(forward_loop *loop, int part);

static void forward_part(void *argument, int part, int parts) {
    forward_loop *loop = argument;
    const int64_t batch = loop->batch, units = loop->units, four = 4 * units;
    const share mine = share_of(batch, units, part, parts);
    const int64_t rows = mine.row_end - mine.row_first, first = mine.unit_first, own = mine.unit_end - first;
    const int64_t gate_row = mine.row_first * four, state_row = mine.row_first * units; /* where its rows start */
    const forward_stats *stats = partial_forward_stats(loop, part);
    for (int64_t k = 0; k < loop->steps; k++) {
        const int64_t t = loop->reverse ? loop->steps - 1 - k : k;
        const int64_t before = loop->reverse ? t + 1 : t - 1;
        const float *h_prev = (k == 0 ? loop->h0 : loop->hidden + before * batch * units) + state_row;
        const float *c_prev = (k == 0 ? loop->c0 : loop->cells + before * batch * units) + state_row;
        float *pre = loop->pre + t * batch * four + gate_row;
        if (rows > 0 && own > 0) {
            for (int gate = 0; gate < 4; gate++)
                product(h_prev, units, &loop->w_t, gate, pre + gate * units, pre + gate * units, four, rows, first,
                        mine.unit_end);
            forward_units(pre + first, c_prev + first, loop->gates + t * batch * four + gate_row + first,
                          loop->cells + t * batch * units + state_row + first,
                          loop->hidden + t * batch * units + state_row + first, rows, units, own, stats, t);
        }
        if (!mine.by_rows)
            barrier_wait(&loop->barrier, parts); /* h_t is whole: the next step's product reads all of it */
    }
}

struct forward_partial {
    forward_stats view;
    int64_t saturated[4];
    double forget_sum;
};

static const forward_stats *partial_forward_stats(forward_loop *loop, int part) {
    if (loop->stats == NULL || part == 0)
        return loop->stats;
    return &loop->partials[part - 1].view;
}

static int forward_partials(forward_partial *partials, int count, const forward_stats *stats, int64_t steps) {
    for (int n = 0; n < count; n++) {
        int32_t *flags = calloc((size_t)(3 * steps + 1), sizeof(int32_t));
        if (flags == NULL) {
            while (n-- > 0)
                free(partials[n].view.pre_nonfinite);
            return -1;
        }
        partials[n] = (forward_partial){.saturated = {0, 0, 0, 0}, .forget_sum = 0.0};
        partials[n].view = *stats;
        partials[n].view.pre_nonfinite = flags;
        partials[n].view.cell_nonfinite = flags + steps;
        partials[n].view.cell_absmax = flags + 2 * steps;
        partials[n].view.saturated = partials[n].saturated;
        partials[n].view.forget_sum = &partials[n].forget_sum;
    }
    return 0;
}

/* Merges the reductions of the threads that ran (`used`) into the caller's and frees all `allocated`. */
static void merge_forward(const forward_stats *stats, forward_partial *partials, int used, int allocated,
                          int64_t steps) {
    for (int n = 0; n < allocated; n++) {
        const forward_stats *p = &partials[n].view;
        for (int64_t t = 0; t < (n < used ? steps : 0); t++) {
            stats->pre_nonfinite[t] |= p->pre_nonfinite[t];
            stats->cell_nonfinite[t] |= p->cell_nonfinite[t];
            if (p->cell_absmax[t] > stats->cell_absmax[t])
                stats->cell_absmax[t] = p->cell_absmax[t];
        }
        for (int k = 0; k < 4; k++)
            stats->saturated[k] += partials[n].saturated[k]; /* 0 for a thread that did not run */
        *stats->forget_sum += partials[n].forget_sum;
        free(p->pre_nonfinite);
    }
}

/* All T steps of one layer-direction forward (see forward_loop's fields); stats NULL when not recording. threads:
 * how many to use at most. Returns 0, or -1 when memory for the weight's tile copy or the per-thread reductions ran
 * out (nothing computed). */
int fastlstm_forward_loop(const float *w_t, float *pre, const float *h0, const float *c0, float *gates, float *cells,
                          float *hidden, int64_t steps, int64_t batch, int64_t units, int64_t reverse,
                          int64_t threads, const forward_stats *stats) {
    const int size = team_size(threads, batch, units);
    forward_partial partials[MAX_THREADS];
    packed_weight packed;
    if (pack_weight(&packed, w_t, 4 * units, units, 4, units) != 0)
        return -1;
    if (stats != NULL && forward_partials(partials, size - 1, stats, steps) != 0) {
        free(packed.tiles);
        return -1;
    }
    forward_loop loop = {packed, pre,   h0,    c0,      gates, cells, hidden,
                         steps,  batch, units, reverse, stats, partials, {0, 0}};
    const int parts = run_team(forward_part, &loop, size);
    if (stats != NULL)
        merge_forward(stats, partials, parts - 1, size - 1, steps);
    free(packed.tiles);
    return 0;
}

/* ---- backward ---- */

typedef struct {
    backward_stats view;
} backward_partial;

typedef struct {
    packed_weight w;       /* [4H, H]: W_hh, one block of H */
    const float *grad_out; /* [T, B, H]: dL/dh_t from above */
    const float *grad_hn, *grad_cn, *c0, *gates, *cells;
    float *grad_gates;        /* [T, B, 4H] */
    float *dh, *dc, *carry;   /* [B, H], [B, H], [2, B, H]: scratch (dc is read only by the reductions) */
    float *grad_h0, *grad_c0; /* [B, H] */
    int64_t steps, batch, units, reverse;
    const backward_stats *stats;
    backward_partial *partials;
    step_barrier barrier;
} backward_loop;

static void backward_part(void *argument, int part, int parts) {
    backward_loop *loop = argument;
    const int64_t batch = loop->batch, units = loop->units, four = 4 * units, state = batch * units;
    const share mine = share_of(batch, units, part, parts);
    const int64_t rows = mine.row_end - mine.row_first, first = mine.unit_first, own = mine.unit_end - first;
    const int64_t gate_row = mine.row_first * four, state_row = mine.row_first * units;
    const backward_stats *stats = loop->stats == NULL || part == 0 ? loop->stats : &loop->partials[part - 1].view;
    const int64_t steps = loop->steps, earliest = loop->reverse ? steps - 1 : 0; /* the step whose c_{t-1} is c0 */
    const int64_t latest = loop->reverse ? 0 : steps - 1;
    float *dh = loop->dh + state_row;
    for (int64_t b = 0; b < rows; b++)
        for (int64_t j = first; j < mine.unit_end; j++)
            dh[b * units + j] = loop->grad_out[latest * state + state_row + b * units + j] +
                                loop->grad_hn[state_row + b * units + j];
    const float *carried = loop->grad_cn;
    for (int64_t k = 0; k < steps; k++) {
        const int64_t t = loop->reverse ? k : steps - 1 - k;
        const float *c_prev = t == earliest ? loop->c0 : loop->cells + (loop->reverse ? t + 1 : t - 1) * state;
        float *carry = loop->carry + (k % 2) * state;
        float *grad_gates = loop->grad_gates + t * batch * four + gate_row;
        const int work = rows > 0 && own > 0;
        if (work)
            backward_units(dh + first, carried + state_row + first, loop->gates + t * batch * four + gate_row + first,
                           loop->cells + t * state + state_row + first, c_prev + state_row + first,
                           loop->dc + state_row + first, grad_gates + first, carry + state_row + first, rows, units,
                           own, stats, t);
        carried = carry;
        if (!mine.by_rows)
            barrier_wait(&loop->barrier, parts); /* every unit's gate gradients of step t are in */
        if (!work)
            continue;
        if (k + 1 < steps) {
            const int64_t next = loop->reverse ? t + 1 : t - 1;
            product(grad_gates, four, &loop->w, 0, loop->grad_out + next * state + state_row, dh, units, rows, first,
                    mine.unit_end);
        } else {
            product(grad_gates, four, &loop->w, 0, NULL, loop->grad_h0 + state_row, units, rows, first, mine.unit_end);
            for (int64_t b = 0; b < rows; b++)
                memcpy(loop->grad_c0 + state_row + b * units + first, carried + state_row + b * units + first,
                       (size_t)own * sizeof(float));
        }
    }
}

static int backward_partials(backward_partial *partials, int count, int64_t steps) {
    for (int n = 0; n < count; n++) {
        void *memory = calloc((size_t)(5 * steps + 1), sizeof(double)); /* 3 int32 and 2 double arrays fit */
        if (memory == NULL) {
            while (n-- > 0)
                free(partials[n].view.hidden_sumsq);
            return -1;
        }
        double *sums = memory;
        int32_t *flags = (int32_t *)(sums + 2 * steps);
        partials[n].view = (backward_stats){flags, flags + steps, flags + 2 * steps, sums, sums + steps};
    }
    return 0;
}

static void merge_backward(const backward_stats *stats, backward_partial *partials, int used, int allocated,
                           int64_t steps) {
    for (int n = 0; n < allocated; n++) {
        const backward_stats *p = &partials[n].view;
        for (int64_t t = 0; t < (n < used ? steps : 0); t++) {
            stats->hidden_nonfinite[t] |= p->hidden_nonfinite[t];
            stats->cell_nonfinite[t] |= p->cell_nonfinite[t];
            stats->gates_nonfinite[t] |= p->gates_nonfinite[t];
            stats->hidden_sumsq[t] += p->hidden_sumsq[t];
            stats->cell_sumsq[t] += p->cell_sumsq[t];
        }
        free(p->hidden_sumsq);
    }
}

/* All T steps of one layer-direction backward (see backward_loop's fields), in the reverse of the forward's order;
 * stats NULL when not recording. Returns 0, or -1 when memory for the weight's tile copy or the per-thread reductions
 * ran out. */
int fastlstm_backward_loop(const float *w, const float *grad_out, const float *grad_hn, const float *grad_cn,
                           const float *c0, const float *gates, const float *cells, float *grad_gates, float *dh,
                           float *dc, float *carry, float *grad_h0, float *grad_c0, int64_t steps, int64_t batch,
                           int64_t units, int64_t reverse, int64_t threads, const backward_stats *stats) {
    const int size = team_size(threads, batch, units);
    backward_partial partials[MAX_THREADS];
    packed_weight packed;
    if (pack_weight(&packed, w, units, 4 * units, 1, units) != 0)
        return -1;
    if (stats != NULL && backward_partials(partials, size - 1, steps) != 0) {
        free(packed.tiles);
        return -1;
    }
    backward_loop loop = {packed, grad_out, grad_hn, grad_cn, c0,    gates,   cells, grad_gates, dh,       dc,
                          carry,  grad_h0,  grad_c0, steps,   batch, units, reverse, stats,      partials, {0, 0}};
    const int parts = run_team(backward_part, &loop, size);
    if (stats != NULL)
        merge_backward(stats, partials, parts - 1, size - 1, steps);
    free(packed.tiles);
    return 0;
}
