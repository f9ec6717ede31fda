#!/usr/bin/env python3
"""Refits the polynomial coefficients of core/src/fused/act.rs and checks the f32 arithmetic.

    pip install numpy mpmath && python3 core/tools/fit_activations.py

exp: e^r = 1 + r + r^2 (c2 + r (c3 + ... c6)) on |r| <= ln2/2.
tanh: tanh(x) = x + x^3 (t0 + x^2 (t1 + ... t4)) on |x| < 0.625.
Each is a least-squares fit on Chebyshev nodes of the relative error, reweighted towards
minimax. The script then runs the same f32 operations act.rs runs (no fused multiply-add) on
a few hundred thousand points and prints the largest error in ulps against mpmath.
"""

import numpy as np
from mpmath import mp, mpf

mp.dps = 40
f32 = np.float32


def cheb(a, b, n):
    k = np.arange(n)
    return (a + b) / 2 + (b - a) / 2 * np.cos((2 * k + 1) * np.pi / (2 * n))


def fit(xs, target, basis, weight, iters=30):
    w = np.ones_like(xs)
    design = np.stack([b(xs) for b in basis], 1)
    for _ in range(iters):
        c, *_ = np.linalg.lstsq(design * (weight * w)[:, None], target * weight * w, rcond=None)
        err = np.abs((design @ c - target) * weight)
        w = w * (err / err.max()) ** 0.5 + 1e-3
    return [f32(v) for v in c], err.max()


def exp_coefficients():
    ln2 = np.log(2.0)
    r = cheb(-ln2 / 2, ln2 / 2, 4000)
    return fit(r, np.exp(r) - 1 - r, [lambda r, k=k: r**k for k in range(2, 7)], 1 / np.exp(r))


def tanh_coefficients(bound=0.625, degree=5):
    x = cheb(1e-4, bound, 3000)
    t = np.array([float(mp.tanh(mpf(float(v)))) for v in x])
    return fit(x, (t - x) / x**3, [lambda x, k=k: x ** (2 * k) for k in range(degree)], x**3 / t)


def exp32(x, c):
    x = np.where(x < f32(-104), f32(-104), x)
    x = np.where(x > f32(89), f32(89), x)
    n = (x * f32(1.4426950408889634) + f32(12582912.0)) - f32(12582912.0)
    r = (x - n * f32(0.693359375)) - n * f32(-2.12194440e-4)
    p = (((c[4] * r + c[3]) * r + c[2]) * r + c[1]) * r + c[0]
    p = (p * r) * r + r + f32(1)
    n1 = np.floor(n * f32(0.5))
    pow2 = lambda k: ((k + f32(127 + 8388608)).view(np.uint32) << np.uint32(23)).view(f32)
    return (p * pow2(n1)) * pow2(n - n1)


def ulps(a, b):
    def key(v):
        i = v.view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)
    return np.abs(key(a) - key(b))


def main():
    ec, e_err = exp_coefficients()
    tc, t_err = tanh_coefficients()
    print("EXP_C  =", [float(v) for v in ec], f"(fit relative error {e_err:.1e})")
    print("TANH_C =", [float(v) for v in tc], f"(fit relative error {t_err:.1e})")
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.uniform(-110, 95, 100000), np.linspace(-2, 2, 100001)]).astype(f32)
    with np.errstate(all="ignore"):
        got = exp32(xs, ec)
        a = np.abs(xs)
        e = exp32(-a, ec)
        sig = np.where(xs >= 0, f32(1), e) / (f32(1) + e)
        a2 = a * a
        q = (((tc[4] * a2 + tc[3]) * a2 + tc[2]) * a2 + tc[1]) * a2 + tc[0]
        th = np.copysign(np.where(a < f32(0.625), a + a * (a2 * q),
                                  f32(1) - f32(2) / (exp32(f32(2) * a, ec) + f32(1))), xs)
    ref = lambda fn: np.array([float(fn(mpf(float(v)))) for v in xs]).astype(f32)
    print("max ulps: exp", ulps(got, ref(mp.exp)).max(),
          "sigmoid", ulps(sig, ref(lambda v: 1 / (1 + mp.exp(-v)))).max(),
          "tanh", ulps(th, ref(mp.tanh)).max())


if __name__ == "__main__":
    main()
