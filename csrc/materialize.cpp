// Row materialization: copies every planned conversation into flat row arrays in one pass.
// All bounds checks happen in layout_rows (with the GIL held); fill_rows trusts them and only moves
// memory, OR-ing the ids it copies so that bad values are reported after the fact.
#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "packing.h"

namespace refit_packing {

RowLayout layout_rows(const int64_t* conv_offsets, int64_t n_conv, int64_t n_tokens,
                      const int64_t* bin_offsets, int64_t n_bins, const int64_t* items,
                      int64_t n_items, int64_t pad_to) {
  if (n_bins < 0 || bin_offsets[0] != 0 || bin_offsets[n_bins] != n_items)
    throw std::invalid_argument("bin_offsets must start at 0 and end at len(items)");
  RowLayout out;
  out.row_offsets.resize(static_cast<size_t>(n_bins) + 1);
  out.cu_offsets.resize(static_cast<size_t>(n_bins) + 1);
  int64_t tok = 0, cu = 0;
  for (int64_t b = 0; b < n_bins; ++b) {
    out.row_offsets[b] = tok;
    out.cu_offsets[b] = cu;
    const int64_t lo = bin_offsets[b], hi = bin_offsets[b + 1];
    if (hi < lo) throw std::invalid_argument("bin_offsets must be non-decreasing");
    int64_t row = 0;
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t c = items[k];
      if (c < 0 || c >= n_conv)
        throw std::invalid_argument("plan refers to conversation " + std::to_string(c) +
                                    " but there are " + std::to_string(n_conv));
      // Bounds of exactly the conversations this call copies: O(rows materialized), not
      // O(all conversations), so one small batch of a big dataset costs microseconds.
      const int64_t a = conv_offsets[c], e = conv_offsets[c + 1];
      if (a < 0 || e > n_tokens || e < a)
        throw std::invalid_argument("conversation " + std::to_string(c) + " has bad offsets [" +
                                    std::to_string(a) + ", " + std::to_string(e) + ") for " +
                                    std::to_string(n_tokens) + " tokens");
      const int64_t len = e - a;
      if (len < 1)
        throw std::invalid_argument("conversation " + std::to_string(c) + " is empty");
      row += len;
    }
    if (row > INT32_MAX || pad_to > INT32_MAX)
      throw std::invalid_argument("row " + std::to_string(b) + " is too long for int32 cu_seqlens");
    if (pad_to > 0 && row > pad_to)
      throw std::invalid_argument("row " + std::to_string(b) + " holds " + std::to_string(row) +
                                  " tokens, more than pad_to=" + std::to_string(pad_to));
    // cu_seqlens of a row: [0, ends of each conversation..., (+ end of the padding segment)]
    cu += (hi - lo) + 1 + ((pad_to > 0 && row < pad_to) ? 1 : 0);
    tok += (pad_to > 0) ? pad_to : row;
    out.real_tokens += row;
  }
  out.row_offsets[n_bins] = tok;
  out.cu_offsets[n_bins] = cu;
  out.total_tokens = tok;
  out.total_cu = cu;
  return out;
}

namespace {

// Positions [j0, j1) of one conversation of length len, written to o*[0, j1 - j0). Returns the OR of
// the copied ids (the caller checks sign and width once per call, not per token).
template <class T, class I>
inline uint64_t fill_span(const I* src, const uint8_t* mk, int64_t j0, int64_t j1, int64_t len,
                          T sid, T* oi, T* ol, T* op, T* os) {
  const T ignore = static_cast<T>(-100);
  uint64_t bits = 0;
  const int64_t n = j1 - j0;
  for (int64_t j = 0; j < n; ++j) {
    bits |= static_cast<uint64_t>(src[j0 + j]);
    oi[j] = static_cast<T>(src[j0 + j]);
  }
  // Target of position j is token j+1 of the same conversation, only where that token is
  // trained; the last position never targets the next conversation's first token.
  // Branch-free select so the loop vectorizes and never mispredicts on ragged masks.
  const int64_t with_next = std::min(j1, len - 1) - j0;
  for (int64_t j = 0; j < with_next; ++j) {
    const T keep = -static_cast<T>(mk[j0 + j + 1] != 0);
    ol[j] = (static_cast<T>(src[j0 + j + 1]) & keep) | (ignore & ~keep);
  }
  for (int64_t j = std::max<int64_t>(with_next, 0); j < n; ++j) ol[j] = ignore;
  for (int64_t j = 0; j < n; ++j) op[j] = static_cast<T>(j0 + j);
  for (int64_t j = 0; j < n; ++j) os[j] = sid;
  return bits;
}

// Plan order visits conversations at random places in the input, so the hardware prefetcher
// restarts at each one. Requesting all lines of the next conversation while this one is copied
// hides that latency (measured: +10-15% on 200k chat-length conversations).
template <class I>
inline void prefetch_conversation(const I* ids, const uint8_t* mask, int64_t a, int64_t e) {
#if defined(__GNUC__) || defined(__clang__)
  const char* p = reinterpret_cast<const char*>(ids + a);
  const char* const pe = reinterpret_cast<const char*>(ids + e);
  for (; p < pe; p += 64) __builtin_prefetch(p, 0, 3);
  for (const uint8_t* m = mask + a; m < mask + e; m += 64) __builtin_prefetch(m, 0, 3);
#else
  (void)ids, (void)mask, (void)a, (void)e;
#endif
}

template <class T>
inline void fill_pad(int64_t j0, int64_t n, T pad_id, T* oi, T* ol, T* op, T* os) {
  for (int64_t j = 0; j < n; ++j) {
    oi[j] = pad_id;
    ol[j] = static_cast<T>(-100);
    op[j] = static_cast<T>(j0 + j);
    os[j] = static_cast<T>(-1);
  }
}

// Stores that bypass the cache for outputs far larger than it: a plain store first reads the line
// it writes (read-for-ownership), so streaming cuts DRAM traffic per token from 2x32+9 to 32+9
// bytes for int64 rows (measured +13% for all rows of 200k conversations into preallocated int64
// arrays). Rows are first built in a small cache-resident scratch by the same code as the direct
// path, then streamed out; only x86-64 (SSE2 is baseline there) takes this path.
#if defined(__SSE2__)
constexpr bool kCanStream = true;
inline void stream_bytes(char* dst, const char* src, size_t n) {
  while (n && (reinterpret_cast<uintptr_t>(dst) & 15)) {  // element-sized head, at most 15 bytes
    *dst++ = *src++;
    --n;
  }
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
  for (; i + 16 <= n; i += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  std::memcpy(dst + i, src + i, n - i);
}
inline void stream_fence() { _mm_sfence(); }
#else
constexpr bool kCanStream = false;
inline void stream_bytes(char* dst, const char* src, size_t n) { std::memcpy(dst, src, n); }
inline void stream_fence() {}
#endif

// Outputs above this many bytes are streamed: well past any per-core L2, so a plain store's line
// would be evicted before reuse anyway; below it (training batches into a reused buffer) the
// rows stay in cache for the host-to-device copy that follows.
#ifndef REFIT_STREAM_ABOVE_MB  // build-time override, for measuring the two paths against each other
#define REFIT_STREAM_ABOVE_MB 64
#endif
constexpr int64_t kStreamAboveBytes = int64_t(REFIT_STREAM_ABOVE_MB) << 20;

// Where fill_rows writes. Rows are laid out back to back, so each output array is written strictly
// in order from position 0 to total_tokens; in streaming mode the writes go to a window of
// kWindow positions in scratch, and every full window is streamed out whole. Streaming whole
// windows (not each conversation) matters: a cache line written partly by streaming stores and
// partly by plain ones, as at every conversation boundary, costs several times a full line.
template <class T>
class RowSink {
 public:
  static constexpr int64_t kWindow = 1024;  // positions; 4 arrays x 1024 x 8 B = 32 KiB: stays in L1

  RowSink(T* ids, T* labels, T* pos, T* seq, bool stream) : out_{ids, labels, pos, seq}, stream_(stream) {
    if (stream_) {
      scratch_.resize(4 * kWindow);
      for (int a = 0; a < 4; ++a) buf_[a] = scratch_.data() + a * kWindow;
    }
  }

  // Calls fill(j0, j1, ids, labels, pos, seq) for consecutive pieces [j0, j1) of the n positions
  // that start at output position `at`, with pointers where piece position j0 goes.
  template <class Fill>
  void write(int64_t at, int64_t n, Fill&& fill) {
    if (!stream_) {
      fill(int64_t(0), n, out_[0] + at, out_[1] + at, out_[2] + at, out_[3] + at);
      return;
    }
    for (int64_t j0 = 0; j0 < n;) {
      const int64_t w = at + j0 - w0_;  // offset in the window
      const int64_t j1 = std::min(n, j0 + (kWindow - w));
      fill(j0, j1, buf_[0] + w, buf_[1] + w, buf_[2] + w, buf_[3] + w);
      j0 = j1;
      if (at + j0 - w0_ == kWindow) flush(kWindow);
    }
  }

  void finish(int64_t total) {
    if (!stream_) return;
    flush(total - w0_);
    stream_fence();  // streamed lines are globally visible before the caller reads the arrays
  }

 private:
  void flush(int64_t n) {
    const size_t bytes = static_cast<size_t>(n) * sizeof(T);
    for (int a = 0; a < 4; ++a)
      stream_bytes(reinterpret_cast<char*>(out_[a] + w0_), reinterpret_cast<const char*>(buf_[a]), bytes);
    w0_ += n;
  }

  T* out_[4];
  T* buf_[4] = {nullptr, nullptr, nullptr, nullptr};
  std::vector<T> scratch_;
  int64_t w0_ = 0;  // output position of the window's first element
  bool stream_;
};

}  // namespace

template <class T, class I>
bool fill_rows(const I* ids, const uint8_t* mask, const int64_t* conv_offsets,
               const int64_t* bin_offsets, int64_t n_bins, const int64_t* items,
               const RowLayout& layout, int64_t pad_to, int64_t pad_id, bool local_seq_ids,
               T* out_ids, T* out_labels, T* out_pos, T* out_seq, int32_t* out_cu,
               int64_t* out_max_seqlen) {
  uint64_t id_bits = 0;  // OR of all copied ids: tells after the fact whether they are valid for T
  const bool stream = kCanStream && layout.total_tokens * int64_t(4 * sizeof(T)) > kStreamAboveBytes;
  RowSink<T> sink(out_ids, out_labels, out_pos, out_seq, stream);
  const int64_t n_items = bin_offsets[n_bins];
  for (int64_t b = 0; b < n_bins; ++b) {
    int64_t at = layout.row_offsets[b];
    const int64_t row_start = at;
    int32_t* cu = out_cu + layout.cu_offsets[b];
    *cu++ = 0;
    int64_t longest = 0;
    for (int64_t k = bin_offsets[b]; k < bin_offsets[b + 1]; ++k) {
      const int64_t c = items[k];
      const int64_t a = conv_offsets[c];
      const int64_t len = conv_offsets[c + 1] - a;
      const T sid = static_cast<T>(local_seq_ids ? k - bin_offsets[b] : c);
      if (k + 1 < n_items)
        prefetch_conversation(ids, mask, conv_offsets[items[k + 1]], conv_offsets[items[k + 1] + 1]);
      sink.write(at, len, [&](int64_t j0, int64_t j1, T* oi, T* ol, T* op, T* os) {
        id_bits |= fill_span<T, I>(ids + a, mask + a, j0, j1, len, sid, oi, ol, op, os);
      });
      at += len;
      *cu++ = static_cast<int32_t>(at - row_start);
      longest = std::max(longest, len);
    }
    if (pad_to > 0 && at - row_start < pad_to) {
      // Padding is one extra segment so varlen attention keeps it apart from real tokens.
      const int64_t pad = pad_to - (at - row_start);
      sink.write(at, pad, [&](int64_t j0, int64_t j1, T* oi, T* ol, T* op, T* os) {
        fill_pad<T>(j0, j1 - j0, static_cast<T>(pad_id), oi, ol, op, os);
      });
      at += pad;
      *cu++ = static_cast<int32_t>(at - row_start);
      longest = std::max(longest, pad);
    }
    out_max_seqlen[b] = longest;
  }
  sink.finish(layout.total_tokens);
  // Ids are sign-extended into id_bits, so a negative one sets bit 63 whatever I is: rejected for
  // both widths of T; int32 rows also reject ids >= 2^31 (only int64 ids can hold those).
  return (id_bits >> (8 * sizeof(T) - 1)) == 0;
}

// Every (rows, ids) width pair: the id type is the data set's, the row type the caller's choice.
#define REFIT_FILL_ROWS(T, I)                                                                    \
  template bool fill_rows<T, I>(const I*, const uint8_t*, const int64_t*, const int64_t*, int64_t, \
                                const int64_t*, const RowLayout&, int64_t, int64_t, bool, T*, T*, \
                                T*, T*, int32_t*, int64_t*);
REFIT_FILL_ROWS(int64_t, int64_t)
REFIT_FILL_ROWS(int64_t, int32_t)
REFIT_FILL_ROWS(int32_t, int64_t)
REFIT_FILL_ROWS(int32_t, int32_t)
#undef REFIT_FILL_ROWS

}  // namespace refit_packing
