/* The pointwise work of one time step of the CPU step loops (fastlstm/reference.py), fused: what eager PyTorch
 * issues as six to nine pointwise ops per step, each a pass over memory and a few microseconds of dispatch, as one
 * pass here, over the units a thread of step_loop.c owns. Built and loaded by fastlstm/fused_step.py, which says when
 * these run and what they replace.
 *
 * float32, [B, 4H] gate rows (blocks i, f, g, o) and [B, H] state rows, of which a function here takes the `count`
 * units from the one its pointers point at (rows `stride` units apart). Written to vectorise under the flags
 * fused_step.py builds with (-O3, no -ffast-math: it would let the compiler assume there are no NaN or inf, and the
 * telemetry exists to find them): every operation below propagates NaN, and +-inf gives what PyTorch's sigmoid
 * gives. */

#include <string.h>

#include "fused_step.h"

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

#define LANES 16            /* partial sums kept apart, so that the forget gate's sum vectorises */

void forward_units(const float *restrict pre, const float *restrict c_prev, float *restrict gates,
                   float *restrict cell, float *restrict hidden, int64_t batch, int64_t stride, int64_t units,
                   const forward_stats *stats, int64_t step) {
    int32_t pre_bits = 0, cell_bits = 0;
    int64_t saturated[4] = {0, 0, 0, 0};
    float forget[LANES] = {0};
    for (int64_t b = 0; b < batch; b++) {
        const float *restrict p = pre + b * 4 * stride;
        float *restrict g = gates + b * 4 * stride;
        for (int k = 0; k < 4; k++)
            for (int64_t j = 0; j < units; j++)
                g[k * stride + j] = sigmoid(p[k * stride + j]);
        const float *restrict cp = c_prev + b * stride;
        float *restrict c = cell + b * stride;
        float *restrict h = hidden + b * stride;
        for (int64_t j = 0; j < units; j++) {
            float candidate = 2.0f * g[2 * stride + j] - 1.0f;
            g[2 * stride + j] = candidate;
            float c_t = g[stride + j] * cp[j] + g[j] * candidate;
            c[j] = c_t;
            h[j] = g[3 * stride + j] * (2.0f * sigmoid(2.0f * c_t) - 1.0f);
        }
        if (stats == NULL)
            continue;
        for (int k = 0; k < 4; k++)
            for (int64_t j = 0; j < units; j++) {
                int32_t bits = magnitude_bits(p[k * stride + j]);
                pre_bits = bits > pre_bits ? bits : pre_bits;
            }
        for (int64_t j = 0; j < units; j++) {
            int32_t bits = magnitude_bits(c[j]);
            cell_bits = bits > cell_bits ? bits : cell_bits;
        }
        for (int k = 0; k < 4; k++) {
            const float *restrict block = g + k * stride;
            const float low = stats->low[k], high = stats->high;
            int32_t count = 0; /* one row: fits, and an int32 count vectorises at the float compares' width */
            for (int64_t j = 0; j < units; j++)
                count += (block[j] < low) + (block[j] > high);
            saturated[k] += count;
        }
        const float *restrict f = g + stride;
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

/* The largest magnitude_bits of `units` elements of each of `rows` rows `stride` apart. */
static int32_t largest_bits(const float *restrict x, int64_t rows, int64_t stride, int64_t units) {
    int32_t largest = 0;
    for (int64_t b = 0; b < rows; b++)
        for (int64_t j = 0; j < units; j++) {
            int32_t bits = magnitude_bits(x[b * stride + j]);
            largest = bits > largest ? bits : largest;
        }
    return largest;
}

/* The squared norm of the same elements, whose largest magnitude_bits are `bits`: taken of x / |x|max (so that no
 * square overflows or underflows in float32, as reference_telemetry._squared_norms does it) and rescaled in double.
 * NaN or inf in x: not scaled, so that the result is NaN or inf as a double sum of squares would be. */
static double squared_norm(const float *restrict x, int64_t rows, int64_t stride, int64_t units, int32_t bits) {
    float scale = 1.0f;
    if (bits > 0 && bits < INF_BITS)
        memcpy(&scale, &bits, sizeof scale);
    const float inverse = 1.0f / scale;
    float part[LANES] = {0};
    for (int64_t b = 0; b < rows; b++) {
        const float *restrict row = x + b * stride;
        int64_t j = 0;
        for (; j + LANES <= units; j += LANES)
            for (int l = 0; l < LANES; l++) {
                float v = row[j + l] * inverse;
                part[l] += v * v;
            }
        for (; j < units; j++) {
            float v = row[j] * inverse;
            part[0] += v * v;
        }
    }
    double total = 0.0;
    for (int l = 0; l < LANES; l++)
        total += part[l];
    return total * (double)scale * (double)scale;
}

void backward_units(const float *restrict dh, const float *restrict grad_c, const float *restrict gates,
                    const float *restrict cell, const float *restrict c_prev, float *restrict dc_out,
                    float *restrict grad_gates, float *restrict carry, int64_t batch, int64_t stride, int64_t units,
                    const backward_stats *stats, int64_t step) {
    for (int64_t b = 0; b < batch; b++) {
        const int64_t row = b * stride;
        const float *restrict i = gates + 4 * row, *restrict f = i + stride, *restrict g = f + stride;
        const float *restrict o = g + stride;
        float *restrict di = grad_gates + 4 * row, *restrict df = di + stride, *restrict dg = df + stride;
        float *restrict d_o = dg + stride;
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
    const int32_t hidden_bits = largest_bits(dh, batch, stride, units);
    const int32_t cell_bits = largest_bits(dc_out, batch, stride, units);
    int32_t gate_bits = 0;
    for (int k = 0; k < 4; k++) {
        int32_t bits = largest_bits(grad_gates + k * stride, batch, 4 * stride, units);
        gate_bits = bits > gate_bits ? bits : gate_bits;
    }
    stats->hidden_nonfinite[step] = hidden_bits >= INF_BITS;
    stats->cell_nonfinite[step] = cell_bits >= INF_BITS;
    stats->gates_nonfinite[step] = gate_bits >= INF_BITS;
    stats->hidden_sumsq[step] = squared_norm(dh, batch, stride, units, hidden_bits);
    stats->cell_sumsq[step] = squared_norm(dc_out, batch, stride, units, cell_bits);
}
