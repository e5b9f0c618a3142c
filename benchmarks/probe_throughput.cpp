// Throughput probe for the instructions behind the quantized kernels (benchmarks/README.md,
// "Where we lose"): 12 independent accumulator chains per instruction, ns per instruction.
// Build and run: g++ -O2 -march=native benchmarks/probe_throughput.cpp -o /tmp/probe && /tmp/probe
// (needs AVX-512 F/BW/BF16/VNNI; a rough probe: 12 chains may not hide every latency).
#include <chrono>
#include <cstdio>
#include <immintrin.h>
template <class F> double bench(F f, long m, int per) {
  auto t0=std::chrono::steady_clock::now(); f(m);
  double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  return s/(m*(double)per)*1e9;
}
int main(){
  long m=50000000;
  volatile float sink;
  double z = bench([&](long m){ __m512 a[12]; for(int i=0;i<12;++i)a[i]=_mm512_set1_ps(0); __m512bh w=(__m512bh)_mm512_set1_epi16(0x3f80);
    for(long i=0;i<m;++i){ for(int j=0;j<12;++j) a[j]=_mm512_dpbf16_ps(a[j],w,w); asm volatile(""::"v"(a[0]));}
    float s=0; for(int j=0;j<12;++j) s+=_mm512_reduce_add_ps(a[j]); sink=s;}, m, 12);
  double y = bench([&](long m){ __m256 a[12]; for(int i=0;i<12;++i)a[i]=_mm256_set1_ps(0); __m256bh w=(__m256bh)_mm256_set1_epi16(0x3f80);
    for(long i=0;i<m;++i){ for(int j=0;j<12;++j) a[j]=_mm256_dpbf16_ps(a[j],w,w); asm volatile(""::"v"(a[0]));}
    __m256 s=a[0]; for(int j=1;j<12;++j) s=_mm256_add_ps(s,a[j]); sink=s[0];}, m, 12);
  double zf = bench([&](long m){ __m512 a[12]; for(int i=0;i<12;++i)a[i]=_mm512_set1_ps(0); __m512 w=_mm512_set1_ps(1e-3f);
    for(long i=0;i<m;++i){ for(int j=0;j<12;++j) a[j]=_mm512_fmadd_ps(a[j],w,w); asm volatile(""::"v"(a[0]));}
    float s=0; for(int j=0;j<12;++j) s+=_mm512_reduce_add_ps(a[j]); sink=s;}, m, 12);
  double yf = bench([&](long m){ __m256 a[12]; for(int i=0;i<12;++i)a[i]=_mm256_set1_ps(0); __m256 w=_mm256_set1_ps(1e-3f);
    for(long i=0;i<m;++i){ for(int j=0;j<12;++j) a[j]=_mm256_fmadd_ps(a[j],w,w); asm volatile(""::"v"(a[0]));}
    __m256 s=a[0]; for(int j=1;j<12;++j) s=_mm256_add_ps(s,a[j]); sink=s[0];}, m, 12);
  double zv = bench([&](long m){ __m512i a[12]; for(int i=0;i<12;++i)a[i]=_mm512_set1_epi32(0); __m512i w=_mm512_set1_epi8(1);
    for(long i=0;i<m;++i){ for(int j=0;j<12;++j) a[j]=_mm512_dpbusd_epi32(a[j],w,w); asm volatile(""::"v"(a[0]));}
    int s=0; for(int j=0;j<12;++j) s+=_mm512_reduce_add_epi32(a[j]); sink=s;}, m, 12);
  double zw = bench([&](long m){ __m512i a[12]; for(int i=0;i<12;++i)a[i]=_mm512_set1_epi32(0); __m512i w=_mm512_set1_epi16(1);
    for(long i=0;i<m;++i){ for(int j=0;j<12;++j) a[j]=_mm512_dpwssd_epi32(a[j],w,w); asm volatile(""::"v"(a[0]));}
    int s=0; for(int j=0;j<12;++j) s+=_mm512_reduce_add_epi32(a[j]); sink=s;}, m, 12);
  double pw = bench([&](long m){ __m512i a[12]; for(int i=0;i<12;++i)a[i]=_mm512_set1_epi16(i); __m512i t=_mm512_set1_epi16(3);
    for(long i=0;i<m;++i){ for(int j=0;j<12;++j) a[j]=_mm512_permutexvar_epi16(a[j],t); asm volatile(""::"v"(a[0]));}
    int s=0; for(int j=0;j<12;++j) s+=_mm512_reduce_add_epi32(a[j]); sink=s;}, m, 12);
  double py = bench([&](long m){ __m256i a[12]; for(int i=0;i<12;++i)a[i]=_mm256_set1_epi16(i); __m256i t=_mm256_set1_epi16(3);
    for(long i=0;i<m;++i){ for(int j=0;j<12;++j) a[j]=_mm256_permutexvar_epi16(a[j],t); asm volatile(""::"v"(a[0]));}
    sink=_mm256_extract_epi32(a[0],0)+_mm256_extract_epi32(a[5],0);}, m, 12);
  printf("ns/instr: zmm dpbf16 %.3f  ymm dpbf16 %.3f | zmm fma %.3f ymm fma %.3f | zmm dpbusd %.3f zmm dpwssd %.3f | zmm vpermw %.3f ymm vpermw %.3f\n", z,y,zf,yf,zv,zw,pw,py);
  printf("MAC/ns: dpbf16 z %.1f y %.1f  fma z %.1f y %.1f  dpbusd %.1f dpwssd %.1f\n", 32/z, 16/y, 16/zf, 8/yf, 64/zv, 32/zw);
}
