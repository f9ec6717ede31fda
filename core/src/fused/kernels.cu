// The fused gate kernels of recur's recurrent layers (see core/src/fused/cuda.rs). Compiled at
// run time by nvrtc for the GPU at hand; CI compiles this file with nvcc to keep it honest.
//
// Layouts match the CPU backend (core/src/fused/cpu.rs): row-major, one row per packed row;
// `pre` holds a step's gate pre-activations (PyTorch's gate order) and receives the gate
// activations; rows at or beyond `prev` have no previous state. One thread per (row, unit).

extern "C" __device__ __forceinline__ float recur_sigmoid(float x) {
    // From e^-|x|, so neither side loses precision (as the CPU kernels do).
    float e = expf(-fabsf(x));
    float s = 1.0f / (1.0f + e);
    return x >= 0.0f ? s : e * s;
}

extern "C" __device__ __forceinline__ bool unit(long long n, long long* e) {
    *e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    return *e < n;
}

extern "C" __global__ void rnn_fwd(const float* pre, const float* hg, const float* bias,
                                   float* out, int rows, int prev, int h, int relu) {
    long long e;
    if (!unit((long long)rows * h, &e)) return;
    int r = (int)(e / h), j = (int)(e % h);
    float a = pre[e] + bias[j] + (r < prev ? hg[e] : 0.0f);
    out[e] = relu ? (a < 0.0f ? 0.0f : a) : tanhf(a);
}

extern "C" __global__ void lstm_fwd(float* pre, const float* hg, const float* bias,
                                    const float* c_prev, float* c, float* tanh_c, float* out,
                                    int rows, int prev, int h) {
    long long e;
    if (!unit((long long)rows * h, &e)) return;
    int r = (int)(e / h), j = (int)(e % h);
    float* g = pre + (long long)r * 4 * h;
    bool has = r < prev;
    const float* p = hg + (long long)r * 4 * h;
    float i = recur_sigmoid(g[j] + bias[j] + (has ? p[j] : 0.0f));
    float f = recur_sigmoid(g[h + j] + bias[h + j] + (has ? p[h + j] : 0.0f));
    float gv = tanhf(g[2 * h + j] + bias[2 * h + j] + (has ? p[2 * h + j] : 0.0f));
    float o = recur_sigmoid(g[3 * h + j] + bias[3 * h + j] + (has ? p[3 * h + j] : 0.0f));
    float cv = f * (has ? c_prev[e] : 0.0f) + i * gv;
    float t = tanhf(cv);
    g[j] = i;
    g[h + j] = f;
    g[2 * h + j] = gv;
    g[3 * h + j] = o;
    c[e] = cv;
    tanh_c[e] = t;
    out[e] = o * t;
}

extern "C" __global__ void gru_fwd(float* pre, const float* hg, const float* bias,
                                   const float* b_hn, const float* h_prev, float* hn_out,
                                   float* out, int rows, int prev, int h) {
    long long e;
    if (!unit((long long)rows * h, &e)) return;
    int r = (int)(e / h), j = (int)(e % h);
    float* g = pre + (long long)r * 3 * h;
    bool has = r < prev;
    const float* p = hg + (long long)r * 3 * h;
    float rv = recur_sigmoid(g[j] + bias[j] + (has ? p[j] : 0.0f));
    float zv = recur_sigmoid(g[h + j] + bias[h + j] + (has ? p[h + j] : 0.0f));
    float hn = (has ? p[2 * h + j] : 0.0f) + b_hn[j];
    float n = tanhf(g[2 * h + j] + bias[2 * h + j] + rv * hn);
    float hp = has ? h_prev[e] : 0.0f;
    g[j] = rv;
    g[h + j] = zv;
    g[2 * h + j] = n;
    hn_out[e] = hn;
    out[e] = n + zv * (hp - n);
}

extern "C" __global__ void rnn_bwd(const float* grad, const float* carry, const float* out,
                                   float* dg, int n, int relu) {
    long long e;
    if (!unit(n, &e)) return;
    float d = grad[e] + carry[e];
    float y = out[e];
    dg[e] = relu ? (y > 0.0f ? d : 0.0f) : d * (1.0f - y * y);
}

extern "C" __global__ void lstm_bwd(const float* grad_h, const float* carry_h, float* carry_c,
                                    const float* gates, const float* tanh_c,
                                    const float* c_prev, float* dg, int rows, int prev, int h) {
    long long e;
    if (!unit((long long)rows * h, &e)) return;
    int r = (int)(e / h), j = (int)(e % h);
    const float* a = gates + (long long)r * 4 * h;
    float* d = dg + (long long)r * 4 * h;
    float i = a[j], f = a[h + j], gv = a[2 * h + j], o = a[3 * h + j], t = tanh_c[e];
    float dh = grad_h[e] + carry_h[e];
    float dc = carry_c[e] + dh * o * (1.0f - t * t);
    float cp = r < prev ? c_prev[e] : 0.0f;
    d[j] = dc * gv * i * (1.0f - i);
    d[h + j] = dc * cp * f * (1.0f - f);
    d[2 * h + j] = dc * i * (1.0f - gv * gv);
    d[3 * h + j] = dh * t * o * (1.0f - o);
    carry_c[e] = dc * f;
}

extern "C" __global__ void gru_bwd(const float* grad, float* carry, const float* gates,
                                   const float* hn, const float* h_prev, float* dg,
                                   float* dg_hidden, int rows, int prev, int h) {
    long long e;
    if (!unit((long long)rows * h, &e)) return;
    int r = (int)(e / h), j = (int)(e % h);
    const float* a = gates + (long long)r * 3 * h;
    float rv = a[j], zv = a[h + j], n = a[2 * h + j];
    float dh = grad[e] + carry[e];
    float hp = r < prev ? h_prev[e] : 0.0f;
    float dn = dh * (1.0f - zv) * (1.0f - n * n);
    float dr = dn * hn[e] * rv * (1.0f - rv);
    float dz = dh * (hp - n) * zv * (1.0f - zv);
    float* d = dg + (long long)r * 3 * h;
    float* q = dg_hidden + (long long)r * 3 * h;
    d[j] = dr;
    d[h + j] = dz;
    d[2 * h + j] = dn;
    q[j] = dr;
    q[h + j] = dz;
    q[2 * h + j] = dn * rv;
    carry[e] = dh * zv;
}

// out[j] = sum_r m[r, j]; one thread per column.
extern "C" __global__ void column_sums(const float* m, float* out, int rows, int cols) {
    long long j;
    if (!unit(cols, &j)) return;
    float s = 0.0f;
    for (long long r = 0; r < rows; ++r) s += m[r * cols + j];
    out[j] = s;
}

// y[r, j] = b[j]: the head's bias, before its product is added.
extern "C" __global__ void fill_rows(float* y, const float* b, int rows, int cols) {
    long long e;
    if (!unit((long long)rows * cols, &e)) return;
    y[e] = b[e % cols];
}
