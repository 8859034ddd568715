/* What step_loop.c's loops and fused_step.c's pointwise step share: the telemetry's reductions and the step. */
#ifndef FASTLSTM_FUSED_STEP_H
#define FASTLSTM_FUSED_STEP_H

#include <stdint.h>

#define INF_BITS 0x7f800000 /* magnitude_bits(inf): a value is NaN or +-inf exactly when its bits reach this */

/* What a recording forward reduces from one step, accumulated across steps (reference_telemetry.py, which turns it
 * into the telemetry): per step, whether a pre-activation and whether a cell state is NaN/inf, and the largest
 * |c_t| (as magnitude_bits); over all steps, the saturated gates of each block and the sum of the forget gate.
 * fastlstm/fused_step.py mirrors this layout. */
typedef struct {
    int32_t *pre_nonfinite;  /* [T] */
    int32_t *cell_nonfinite; /* [T] */
    int32_t *cell_absmax;    /* [T] */
    int64_t *saturated;      /* [4] */
    double *forget_sum;      /* [1] */
    float low[4];            /* below: saturated, per gate block (the candidate's is -TANH_HIGH) */
    float high;              /* above: saturated, every block */
} forward_stats;

/* What a recording backward reduces from one step (reference_telemetry.py turns it into the telemetry): whether
 * dL/dh_t, dL/dc_t and the gate gradients are NaN/inf, and the squared norms of dL/dh_t and dL/dc_t. */
typedef struct {
    int32_t *hidden_nonfinite; /* [T] */
    int32_t *cell_nonfinite;   /* [T] */
    int32_t *gates_nonfinite;  /* [T] */
    double *hidden_sumsq;      /* [T] */
    double *cell_sumsq;        /* [T] */
} backward_stats;

/* The forward step of `units` units, as reference._forward_loop's body without lengths, restarts or projection.
 * pre: the step's pre-activations with h_{t-1} W_hh^T added (the candidate's doubled, so that tanh(x) =
 * 2 sigma(2x) - 1 comes from the same sigmoid); c_prev: c_{t-1}. Writes the activated gates (g as tanh), c_t and
 * h_t = o tanh(c_t); with stats (else NULL), sets step `step`'s reductions of these units and adds to the sums. */
void forward_units(const float *pre, const float *c_prev, float *gates, float *cell, float *hidden, int64_t batch,
                   int64_t stride, int64_t units, const forward_stats *stats, int64_t step);

/* The backward step of `units` units, as reference._backward_loop's body without lengths, restarts or projection,
 * with the gate derivatives (reference._GateDerivatives) computed here from the forward's gates and cell states.
 * dh: dL/dh_t; grad_c: the dL/dc carried from step t+1; gates: the step's activated gates (g as tanh); cell, c_prev:
 * c_t, c_{t-1}. Writes dc = grad_c + dh o (1 - tanh^2 c_t) into dc_out, the gate gradients into grad_gates and
 * dc f_t into carry (which must not be grad_c); with stats (else NULL), sets step `step`'s reductions of these
 * units. */
void backward_units(const float *dh, const float *grad_c, const float *gates, const float *cell, const float *c_prev,
                    float *dc_out, float *grad_gates, float *carry, int64_t batch, int64_t stride, int64_t units,
                    const backward_stats *stats, int64_t step);

#endif
