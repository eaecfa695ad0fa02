// Core of the conversation packer: bin planning and row materialization, free of Python so the
// pybind11 layer (bindings.cpp) stays a thin shell that only converts arrays and drops the GIL.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace refit_packing {

// High 64 bits of a 64x64-bit product; the portable branch keeps MSVC builds working.
inline uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__SIZEOF_INT128__)
  __extension__ typedef unsigned __int128 u128;
  return static_cast<uint64_t>((static_cast<u128>(a) * b) >> 64);
#else
  const uint64_t a_lo = a & 0xFFFFFFFFu, a_hi = a >> 32, b_lo = b & 0xFFFFFFFFu, b_hi = b >> 32;
  const uint64_t p0 = a_lo * b_lo, p1 = a_lo * b_hi, p2 = a_hi * b_lo, p3 = a_hi * b_hi;
  const uint64_t mid = (p0 >> 32) + (p1 & 0xFFFFFFFFu) + (p2 & 0xFFFFFFFFu);
  return p3 + (p1 >> 32) + (p2 >> 32) + (mid >> 32);
#endif
}

// splitmix64: tiny, fully specified, and trivial to reproduce bit-for-bit in the Python test
// reference, which is what makes "same input + seed => same plan" checkable across platforms.
struct SplitMix64 {
  uint64_t state;
  explicit SplitMix64(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Multiply-shift range reduction: no division, bias below n / 2^64 (nil for any real n).
  uint64_t below(uint64_t n) { return mulhi64(next(), n); }
};

// Fisher-Yates from the back: a[i] <-> a[below(i + 1)] for i = n-1 .. 1.
template <class T>
void shuffle_in_place(T* a, int64_t n, SplitMix64& rng) {
  for (int64_t i = n - 1; i > 0; --i) {
    int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i + 1)));
    T t = a[i];
    a[i] = a[j];
    a[j] = t;
  }
}

// Largest supported row budget (2^24 tokens): the planner's per-capacity tables stay <= 256 MiB.
constexpr int64_t kMaxTokensLimit = int64_t(1) << 24;

enum class Strategy : int { kBestFitDecreasing = 0, kFirstFitShuffle = 1 };

// Bins in CSR form: bin k holds items[bin_offsets[k] : bin_offsets[k+1]] (conversation indices).
struct Plan {
  std::vector<int64_t> bin_offsets;
  std::vector<int64_t> items;
};

// Plans bins of capacity max_tokens. Conversations longer than max_tokens are skipped (the caller
// counts them as dropped); a length < 1 throws std::invalid_argument. Bins come out shuffled.
Plan plan_bins(const int64_t* lengths, int64_t n, int64_t max_tokens, Strategy strategy,
               uint64_t seed);

// Sizes of the flat outputs of materialize, computed (and bounds-checked) before any allocation.
struct RowLayout {
  std::vector<int64_t> row_offsets;  // [rows + 1] into the flat token arrays
  std::vector<int64_t> cu_offsets;   // [rows + 1] into the flat cu_seqlens array
  int64_t total_tokens = 0;
  int64_t total_cu = 0;
  int64_t real_tokens = 0;  // conversation tokens, padding excluded
};

// Validates the plan against the conversation offsets (every item in range, every referenced
// conversation non-empty and inside the n_tokens buffer, every row within pad_to when pad_to > 0)
// and lays the rows out. Throws std::invalid_argument on bad input.
RowLayout layout_rows(const int64_t* conv_offsets, int64_t n_conv, int64_t n_tokens,
                      const int64_t* bin_offsets, int64_t n_bins, const int64_t* items,
                      int64_t n_items, int64_t pad_to);

// Fills every row. Pure memory traffic; runs with the GIL released. T (the rows) and I (the flat
// ids, kept as the data set stores them so that an int32 Arrow column needs no widening copy) are
// each int64_t or int32_t. seq_ids are the conversation's index in the input, or with
// local_seq_ids its place in its row (0..k-1), which is what per-row segment reductions index by.
// Returns false if some token id is negative or does not fit in T (the rows are then garbage).
template <class T, class I>
bool fill_rows(const I* ids, const uint8_t* mask, const int64_t* conv_offsets,
               const int64_t* bin_offsets, int64_t n_bins, const int64_t* items,
               const RowLayout& layout, int64_t pad_to, int64_t pad_id, bool local_seq_ids,
               T* out_ids, T* out_labels, T* out_pos, T* out_seq, int32_t* out_cu,
               int64_t* out_max_seqlen);

// One 1-D input array as flatten sees it: numpy's dtype kind ('i', 'u', 'b') and item size, and a
// byte stride (views with steps are copied without a contiguous temporary).
struct ArrayRef {
  const char* data = nullptr;
  int64_t size = 0;
  int64_t stride = 0;
  char kind = 'i';
  int itemsize = 8;
};

struct FlattenError {
  enum What : int { kNone = 0, kNegativeId = 1, kMaskValue = 2 };
  int64_t conversation = -1;  // -1: no error
  What what = kNone;
  int64_t position = -1;  // within the conversation
};

// Copies conversation i's ids (as O: int64_t, or int32_t when every id array's type fits in it)
// and mask (as uint8) to out_ids/out_mask back to back, in order, checking that ids are >= 0 (and
// fit int64) and mask values are 0 or 1. Stops at the first bad conversation. Sizes of ids[i] and
// masks[i] must match (the caller checks).
template <class O>
FlattenError concat_conversations(const std::vector<ArrayRef>& ids, const std::vector<ArrayRef>& masks,
                                  O* out_ids, uint8_t* out_mask);

}  // namespace refit_packing
