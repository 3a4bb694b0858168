// phi = mean (SPEC.md "Compression branch"): compressed token i of a sequence is the average of
// the raw tokens [i*d, i*d + l) of each KV head, for K (dk) and V (dv), rounded to bf16 once.
// One thread per (compressed token, KV head, 8-element chunk): 16-byte loads along the head dim.
//
// items[c] = (first raw token, global index of the compressed token), both absolute in the
// packed batch.

__device__ __forceinline__ void acc8(float (&a)[8], uint4 u) {
    const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        a[2 * k] += bf16x2_lo(w[k]);
        a[2 * k + 1] += bf16x2_hi(w[k]);
    }
}

extern "C" __global__ void compress_mean(const bf16_t* __restrict__ k, const bf16_t* __restrict__ v,
                                         const int2* __restrict__ items, int nitems,
                                         bf16_t* __restrict__ kc, bf16_t* __restrict__ vc) {
    constexpr int CK = DK / 8, CV = DV / 8;
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)nitems * HKV * (CK + CV)) return;
    const int c = (int)(idx % (CK + CV));
    const i64 rest = idx / (CK + CV);
    const int g = (int)(rest % HKV);
    const int2 itm = items[rest / HKV];
    const bool is_k = c < CK;
    const int D = is_k ? DK : DV;
    const int off = (is_k ? c : c - CK) * 8;
    const bf16_t* src = (is_k ? k : v) + ((i64)itm.x * HKV + g) * D + off;
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int r = 0; r < CMP_L; ++r) acc8(a, *(const uint4*)(src + (i64)r * HKV * D));
    const float inv = 1.f / (float)CMP_L;
    uint4 res;
    res.x = pack_bf16x2(a[0] * inv, a[1] * inv);
    res.y = pack_bf16x2(a[2] * inv, a[3] * inv);
    res.z = pack_bf16x2(a[4] * inv, a[5] * inv);
    res.w = pack_bf16x2(a[6] * inv, a[7] * inv);
    *(uint4*)((is_k ? kc : vc) + ((i64)itm.y * HKV + g) * D + off) = res;
}
