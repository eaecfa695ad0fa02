// Row materialization: copies every planned conversation into flat row arrays in one pass.
// All checks happen in layout_rows (with the GIL held); fill_rows trusts them and only moves memory.
#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>

#include "packing.h"

namespace refit_packing {

RowLayout layout_rows(const int64_t* conv_offsets, int64_t n_conv, const int64_t* bin_offsets,
                      int64_t n_bins, const int64_t* items, int64_t n_items, int64_t pad_to) {
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
      const int64_t len = conv_offsets[c + 1] - conv_offsets[c];
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

template <class T>
bool fill_rows(const int64_t* ids, const uint8_t* mask, const int64_t* conv_offsets,
               const int64_t* bin_offsets, int64_t n_bins, const int64_t* items,
               const RowLayout& layout, int64_t pad_to, int64_t pad_id, T* out_ids, T* out_labels,
               T* out_pos, T* out_seq, int32_t* out_cu, int64_t* out_max_seqlen) {
  const T ignore = static_cast<T>(-100);
  uint64_t id_bits = 0;  // OR of all copied ids: tells after the fact whether they fit in T
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
      const int64_t* src = ids + a;
      const uint8_t* mk = mask + a;
      T* oi = out_ids + at;
      T* ol = out_labels + at;
      T* op = out_pos + at;
      T* os = out_seq + at;
      if constexpr (std::is_same<T, int64_t>::value) {
        std::memcpy(oi, src, static_cast<size_t>(len) * sizeof(int64_t));
      } else {
        for (int64_t j = 0; j < len; ++j) {
          id_bits |= static_cast<uint64_t>(src[j]);
          oi[j] = static_cast<T>(src[j]);
        }
      }
      // Target of position j is token j+1 of the same conversation, only where that token is
      // trained; the last position never targets the next conversation's first token.
      // Branch-free select so the loop vectorizes and never mispredicts on ragged masks.
      for (int64_t j = 0; j + 1 < len; ++j) {
        const T keep = -static_cast<T>(mk[j + 1] != 0);
        ol[j] = (static_cast<T>(src[j + 1]) & keep) | (ignore & ~keep);
      }
      ol[len - 1] = ignore;
      for (int64_t j = 0; j < len; ++j) op[j] = static_cast<T>(j);
      const T sid = static_cast<T>(c);
      for (int64_t j = 0; j < len; ++j) os[j] = sid;
      at += len;
      *cu++ = static_cast<int32_t>(at - row_start);
      longest = std::max(longest, len);
    }
    if (pad_to > 0 && at - row_start < pad_to) {
      // Padding is one extra segment so varlen attention keeps it apart from real tokens.
      const int64_t pad = pad_to - (at - row_start);
      T* oi = out_ids + at;
      T* ol = out_labels + at;
      T* op = out_pos + at;
      T* os = out_seq + at;
      for (int64_t j = 0; j < pad; ++j) {
        oi[j] = static_cast<T>(pad_id);
        ol[j] = ignore;
        op[j] = static_cast<T>(j);
        os[j] = static_cast<T>(-1);
      }
      at += pad;
      *cu++ = static_cast<int32_t>(at - row_start);
      longest = std::max(longest, pad);
    }
    out_max_seqlen[b] = longest;
  }
  // Negative ids set the top bit too, so this rejects them as well as ids >= 2^31 for int32.
  return sizeof(T) == 8 || (id_bits >> 31) == 0;
}

template bool fill_rows<int64_t>(const int64_t*, const uint8_t*, const int64_t*, const int64_t*,
                                 int64_t, const int64_t*, const RowLayout&, int64_t, int64_t,
                                 int64_t*, int64_t*, int64_t*, int64_t*, int32_t*, int64_t*);
template bool fill_rows<int32_t>(const int64_t*, const uint8_t*, const int64_t*, const int64_t*,
                                 int64_t, const int64_t*, const RowLayout&, int64_t, int64_t,
                                 int32_t*, int32_t*, int32_t*, int32_t*, int32_t*, int64_t*);

}  // namespace refit_packing
