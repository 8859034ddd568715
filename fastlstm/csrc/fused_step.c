/* One time step of the CPU step loops (fastlstm/reference.py), fused: what eager PyTorch issues as six to nine
 * pointwise ops per step, each a pass over memory and a few microseconds of dispatch, as one pass here.
 * Built and loaded by fastlstm/fused_step.py, which says when these run and what they replace.
 *
 * float32, contiguous [B, 4H] gate rows (blocks i, f, g, o) and [B, H] state rows. Written to vectorise under
 * the flags fused_step.py builds with (-O3, no -ffast-math: it would let the compiler assume there are no NaN or
 * inf, and the telemetry exists to find them): every operation below propagates NaN, and +-inf gives what
 * PyTorch's sigmoid gives. */

#include <stdint.h>
#include <string.h>

/* e^x for x <= 0 (x may be NaN: the result is NaN). Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, and a
 * degree-6 polynomial for e^r (the coefficients of the Cephes library's expf, whose error is below 1 ulp over that
 * range); 2^n is applied as two factors, so that results down to the smallest subnormal stay exact in exponent. */
static inline float exp_nonpositive(float x) {
    x = x < -110.0f ? -110.0f : x; /* e^-110 rounds to zero; a NaN compares false and stays NaN */
    const float round = 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to the nearest integer */
    float n = (x * 1.44269504088896341f + round) - round;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t k = (int32_t)n; /* in [-159, 0] (NaN converts to some integer; p is NaN then anyway) */
    k = k < -160 ? -160 : k;
    int32_t k1 = k / 2, k2 = k - k1;
    int32_t bits1 = (k1 + 127) << 23, bits2 = (k2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &bits1, sizeof s1);
    memcpy(&s2, &bits2, sizeof s2);
    return p * s1 * s2;
}

/* sigma(x) from e^-|x|, which never overflows: 1 / (1 + e) for x >= 0, e / (1 + e) below (and for NaN). */
static inline float sigmoid(float x) {
    float e = exp_nonpositive(x < 0.0f ? x : -x);
    float d = 1.0f / (1.0f + e);
    return x >= 0.0f ? d : e * d;
}

/* The bits of |x| as an integer: for non-negative floats the integer order is the float order, and NaN's bits
 * exceed inf's, so an integer maximum (which vectorises without -ffast-math, unlike a float one) finds the largest
 * magnitude and is NaN's pattern when a NaN is present. */
static inline int32_t magnitude_bits(float x) {
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits & 0x7fffffff;
}

#define INF_BITS 0x7f800000 /* magnitude_bits(inf): a value is NaN or +-inf exactly when its bits reach this */
#define LANES 16            /* partial sums kept apart, so that the forget gate's sum vectorises */

/* What a recording forward reduces from one step, accumulated across steps (reference_telemetry.py, which turns it
 * into the telemetry): per step, whether a pre-activation and whether a cell state is NaN/inf, and the largest
 * |c_t| (as magnitude_bits); over all steps, the saturated gates of each block and the sum of the forget gate. */
typedef struct {
    int32_t *pre_nonfinite;  /* [T] */
    int32_t *cell_nonfinite; /* [T] */
    int32_t *cell_absmax;    /* [T] */
    int64_t *saturated;      /* [4] */
    double *forget_sum;      /* [1] */
    float low[4];            /* below: saturated, per gate block (the candidate's is -TANH_HIGH) */
    float high;              /* above: saturated, every block */
} forward_stats;

/* Forward step, as reference._forward_loop's body without lengths, restarts or projection. pre: the step's
 * pre-activations (the candidate's doubled, so that tanh(x) = 2 sigma(2x) - 1 comes from the same sigmoid);
 * c_prev: c_{t-1}. Writes the activated gates (g as tanh), c_t and h_t = o tanh(c_t); with stats (else NULL), adds
 * step `step`'s reductions to them. */
void fastlstm_forward_step(const float *restrict pre, const float *restrict c_prev, float *restrict gates,
                           float *restrict cell, float *restrict hidden, int64_t batch, int64_t units,
                           const forward_stats *stats, int64_t step) {
    int32_t pre_bits = 0, cell_bits = 0;
    int64_t saturated[4] = {0, 0, 0, 0};
    float forget[LANES] = {0};
    for (int64_t b = 0; b < batch; b++) {
        const float *restrict p = pre + b * 4 * units;
        float *restrict g = gates + b * 4 * units;
        for (int64_t j = 0; j < 4 * units; j++)
            g[j] = sigmoid(p[j]);
        const float *restrict cp = c_prev + b * units;
        float *restrict c = cell + b * units;
        float *restrict h = hidden + b * units;
        for (int64_t j = 0; j < units; j++) {
            float candidate = 2.0f * g[2 * units + j] - 1.0f;
            g[2 * units + j] = candidate;
            float c_t = g[units + j] * cp[j] + g[j] * candidate;
            c[j] = c_t;
            h[j] = g[3 * units + j] * (2.0f * sigmoid(2.0f * c_t) - 1.0f);
        }
        if (stats == NULL)
            continue;
        for (int64_t j = 0; j < 4 * units; j++) {
            int32_t bits = magnitude_bits(p[j]);
            pre_bits = bits > pre_bits ? bits : pre_bits;
        }
        for (int64_t j = 0; j < units; j++) {
            int32_t bits = magnitude_bits(c[j]);
            cell_bits = bits > cell_bits ? bits : cell_bits;
        }
        for (int k = 0; k < 4; k++) {
            const float *restrict block = g + k * units;
            const float low = stats->low[k], high = stats->high;
            int32_t count = 0; /* one row: fits, and an int32 count vectorises at the float compares' width */
            for (int64_t j = 0; j < units; j++)
                count += (block[j] < low) + (block[j] > high);
            saturated[k] += count;
        }
        const float *restrict f = g + units;
        int64_t j = 0;
        for (; j + LANES <= units; j += LANES)
            for (int l = 0; l < LANES; l++)
                forget[l] += f[j + l];
        for (; j < units; j++)
            forget[0] += f[j];
    }
    if (stats == NULL)
        return;
    stats->pre_nonfinite[step] = pre_bits >= INF_BITS;
    stats->cell_nonfinite[step] = cell_bits >= INF_BITS;
    stats->cell_absmax[step] = cell_bits;
    double forget_total = 0.0;
    for (int l = 0; l < LANES; l++)
        forget_total += forget[l];
    *stats->forget_sum += forget_total;
    for (int k = 0; k < 4; k++)
        stats->saturated[k] += saturated[k];
}

/* The largest magnitude_bits of x[0..n). */
static int32_t largest_bits(const float *restrict x, int64_t n) {
    int32_t largest = 0;
    for (int64_t j = 0; j < n; j++) {
        int32_t bits = magnitude_bits(x[j]);
        largest = bits > largest ? bits : largest;
    }
    return largest;
}

/* The squared norm of x[0..n), whose largest magnitude_bits are `bits`: taken of x / |x|max (so that no square
 * overflows or underflows in float32, as reference_telemetry._squared_norms does it) and rescaled in double. NaN or
 * inf in x: not scaled, so that the result is NaN or inf as a double sum of squares would be. */
static double squared_norm(const float *restrict x, int64_t n, int32_t bits) {
    float scale = 1.0f;
    if (bits > 0 && bits < INF_BITS)
        memcpy(&scale, &bits, sizeof scale);
    const float inverse = 1.0f / scale;
    float part[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float v = x[j + l] * inverse;
            part[l] += v * v;
        }
    for (; j < n; j++) {
        float v = x[j] * inverse;
        part[0] += v * v;
    }
    double total = 0.0;
    for (int l = 0; l < LANES; l++)
        total += part[l];
    return total * (double)scale * (double)scale;
}

/* What a recording backward reduces from one step (reference_telemetry.py turns it into the telemetry): whether
 * dL/dh_t, dL/dc_t and the gate gradients are NaN/inf, and the squared norms of dL/dh_t and dL/dc_t. */
typedef struct {
    int32_t *hidden_nonfinite; /* [T] */
    int32_t *cell_nonfinite;   /* [T] */
    int32_t *gates_nonfinite;  /* [T] */
    double *hidden_sumsq;      /* [T] */
    double *cell_sumsq;        /* [T] */
} backward_stats;

/* Backward step, as reference._backward_loop's body without lengths, restarts or projection, with the gate
 * derivatives (reference._GateDerivatives) computed here from the forward's gates and cell states instead of for all
 * steps before the loop. dh: dL/dh_t; grad_c: the dL/dc carried from step t+1; gates: the step's activated gates
 * (g as tanh); cell, c_prev: c_t, c_{t-1}. Writes dc = grad_c + dh o (1 - tanh^2 c_t) into dc_out, the gate
 * gradients [B, 4H] into grad_gates and dc f_t into carry (which must not be grad_c: the caller alternates two
 * buffers); with stats (else NULL), step `step`'s reductions. */
void fastlstm_backward_step(const float *restrict dh, const float *restrict grad_c, const float *restrict gates,
                            const float *restrict cell, const float *restrict c_prev, float *restrict dc_out,
                            float *restrict grad_gates, float *restrict carry, int64_t batch, int64_t units,
                            const backward_stats *stats, int64_t step) {
    for (int64_t b = 0; b < batch; b++) {
        const int64_t row = b * units;
        const float *restrict i = gates + 4 * row, *restrict f = i + units, *restrict g = f + units;
        const float *restrict o = g + units;
        float *restrict di = grad_gates + 4 * row, *restrict df = di + units, *restrict dg = df + units;
        float *restrict d_o = dg + units;
        for (int64_t j = 0; j < units; j++) {
            float tanh_c = 2.0f * sigmoid(2.0f * cell[row + j]) - 1.0f; /* as the forward computed it */
            float d_h = dh[row + j];
            float dc = grad_c[row + j] + d_h * (o[j] * (1.0f - tanh_c * tanh_c));
            dc_out[row + j] = dc;
            di[j] = dc * (g[j] * (i[j] * (1.0f - i[j])));
            df[j] = dc * (c_prev[row + j] * (f[j] * (1.0f - f[j])));
            dg[j] = dc * (i[j] * (1.0f - g[j] * g[j]));
            d_o[j] = d_h * (tanh_c * (o[j] * (1.0f - o[j])));
            carry[row + j] = dc * f[j];
        }
    }
    if (stats == NULL)
        return;
    const int64_t n = batch * units;
    int32_t hidden_bits = largest_bits(dh, n), cell_bits = largest_bits(dc_out, n);
    stats->hidden_nonfinite[step] = hidden_bits >= INF_BITS;
    stats->cell_nonfinite[step] = cell_bits >= INF_BITS;
    stats->gates_nonfinite[step] = largest_bits(grad_gates, 4 * n) >= INF_BITS;
    stats->hidden_sumsq[step] = squared_norm(dh, n, hidden_bits);
    stats->cell_sumsq[step] = squared_norm(dc_out, n, cell_bits);
}
