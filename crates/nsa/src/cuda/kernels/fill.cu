// Random device-side inputs for benchmarks (no host round trip for gigabytes of activations):
// element i of a tensor is a function of (seed, i) alone (a 64-bit mix), so a fill is
// reproducible and independent of the launch shape.

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float unit_open(unsigned int u) {   // (0, 1]
    return ((float)(u >> 8) + 1.f) * (1.f / 16777216.f);
}

// N(0, 1) (Box-Muller) in the 16-bit element type (bf16, or f16 under ELEM_F16; the name stays)
extern "C" __global__ void fill_normal_bf16(bf16_t* __restrict__ dst, i64 n, unsigned long long seed) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const unsigned long long r = mix64(seed ^ mix64((unsigned long long)i));
        const float u1 = unit_open((unsigned int)r), u2 = unit_open((unsigned int)(r >> 32));
        const float z = sqrtf(-2.f * __logf(u1)) * __cosf(6.2831853f * u2);
        dst[i] = f32_to_bf16(z);
    }
}

// f32 ~ U(0, 1) (gate values)
extern "C" __global__ void fill_uniform_f32(float* __restrict__ dst, i64 n, unsigned long long seed) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        dst[i] = unit_open((unsigned int)mix64(seed ^ mix64((unsigned long long)i)));
    }
}
