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

extern "C" __global__ void rnn_fwd(const float* pre, const float* hg, const float* b_ih,
                                   const float* b_hh, float* out, int rows, int prev, int h,
                                   int relu) {
    long long e;
    if (!unit((long long)rows * h, &e)) return;
    int r = (int)(e / h), j = (int)(e % h);
    float a = pre[e] + b_ih[j] + b_hh[j] + (r < prev ? hg[e] : 0.0f);
    out[e] = relu ? (a < 0.0f ? 0.0f : a) : tanhf(a);
}

// The pre-activation of gate column `k` of a row: input projection, both biases, and the
// recurrent product when the row has a previous state.
extern "C" __device__ __forceinline__ float gate(const float* g, const float* p, bool has,
                                                 const float* b_ih, const float* b_hh, int k) {
    return g[k] + b_ih[k] + b_hh[k] + (has ? p[k] : 0.0f);
}

extern "C" __global__ void lstm_fwd(float* pre, const float* hg, const float* b_ih,
                                    const float* b_hh, const float* c_prev, float* c,
                                    float* tanh_c, float* out, int rows, int prev, int h) {
    long long e;
    if (!unit((long long)rows * h, &e)) return;
    int r = (int)(e / h), j = (int)(e % h);
    float* g = pre + (long long)r * 4 * h;
    bool has = r < prev;
    const float* p = hg + (long long)r * 4 * h;
    float i = recur_sigmoid(gate(g, p, has, b_ih, b_hh, j));
    float f = recur_sigmoid(gate(g, p, has, b_ih, b_hh, h + j));
    float gv = tanhf(gate(g, p, has, b_ih, b_hh, 2 * h + j));
    float o = recur_sigmoid(gate(g, p, has, b_ih, b_hh, 3 * h + j));
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

// GRU: b_hn (the n block of b_hh) sits inside r * (W_hn h + b_hn), as in PyTorch.
extern "C" __global__ void gru_fwd(float* pre, const float* hg, const float* b_ih,
                                   const float* b_hh, const float* h_prev, float* hn_out,
                                   float* out, int rows, int prev, int h) {
    long long e;
    if (!unit((long long)rows * h, &e)) return;
    int r = (int)(e / h), j = (int)(e % h);
    float* g = pre + (long long)r * 3 * h;
    bool has = r < prev;
    const float* p = hg + (long long)r * 3 * h;
    float rv = recur_sigmoid(gate(g, p, has, b_ih, b_hh, j));
    float zv = recur_sigmoid(gate(g, p, has, b_ih, b_hh, h + j));
    float hn = (has ? p[2 * h + j] : 0.0f) + b_hh[2 * h + j];
    float n = tanhf(g[2 * h + j] + b_ih[2 * h + j] + rv * hn);
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

// y[e] = v: the ones that turn a column sum into a matrix product.
extern "C" __global__ void fill(float* y, float v, int n) {
    long long e;
    if (!unit(n, &e)) return;
    y[e] = v;
}

// y[r, j] = b[j]: the head's bias, before its product is added.
extern "C" __global__ void fill_rows(float* y, const float* b, int rows, int cols) {
    long long e;
    if (!unit((long long)rows * cols, &e)) return;
    y[e] = b[e % cols];
}
