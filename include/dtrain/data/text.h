#pragma once
// Text as a token data set: conversion of plain text files (Debian's
// fortunes) into a training and a held-out split, and the vocabulary that
// maps token ids back to text. No LibTorch; the loader of fixed-length
// windows is in dtrain/data/token_loader.h.
//
// A token data set is an ordinary data set (dataset.h) with one scalar
// integer field, "tokens", holding the token stream one token per sample
// (uint8 when the vocabulary has at most 256 ids, else int32), and the
// vocabulary in its manifest:
//
//   "vocabulary": {"level": "char", "size": 113, "code_points": [9, 10, 32, ...]}
//   "vocabulary": {"level": "byte", "size": 256}
//
// Char level: id i is the Unicode character code_points[i] (ascending), the
// text is UTF-8. Byte level: id i is the byte i of the UTF-8 text. See
// docs/data.md, "Text data sets".

#include <cstdint>
#include <string>
#include <vector>

#include "dtrain/data/dataset.h"

namespace dtrain::data {

/// Where Debian's fortunes package (apt-get install fortunes) puts its texts.
inline constexpr const char* kFortunesDir = "/usr/share/games/fortunes";

/// The text files convert_text reads from `source`, in the order it reads
/// them. A regular file is taken alone. A directory gives its regular files
/// (not symbolic links, not subdirectories), sorted by name, except names
/// that end in ".dat" (strfile's indexes) or start with '.': for
/// kFortunesDir, the 43 English files of fortunes and fortunes-min; the
/// offensive set (fortunes-off, in the off/ subdirectory) and other
/// languages (their own subdirectories) are left out, and the *.u8 links
/// point at files already taken. Throws DataError if `source` does not
/// exist or gives no file.
std::vector<std::string> text_source_files(const std::string& source);

/// The records of a fortune file: each record ends right after a line that
/// is exactly "%" (the separator, newline included), or at the end of the
/// text. Concatenated, the records are `text` exactly.
std::vector<std::string> split_records(const std::string& text);

/// Record i (counted over every file, in order) is held out when
/// floor((i + 1) * val_fraction) > floor(i * val_fraction): evenly spaced,
/// floor(records * val_fraction) of them (for 0.1: records 9, 19, 29, ...).
bool is_held_out(std::int64_t record, double val_fraction);

/// The vocabulary of `text` (UTF-8) at `level`: for kChar, every character
/// that occurs, ascending by code point; for kByte, the 256 byte values.
/// Throws DataError naming `source` and the byte offset if `text` is not
/// valid UTF-8 at kChar.
Vocabulary build_vocabulary(TokenLevel level, const std::string& text,
                            const std::string& source = "the text");

/// Token ids of `text` (UTF-8). Throws DataError naming `source` and the
/// byte offset on invalid UTF-8 (kChar) or a character the vocabulary lacks.
std::vector<std::int64_t> encode_text(const Vocabulary& vocabulary, const std::string& text,
                                      const std::string& source = "the text");

/// The text of `count` token ids (UTF-8 for kChar; the bytes for kByte, so
/// a whole split decodes to its exact text). Throws InvalidArgument on an id
/// outside [0, vocabulary.size()).
std::string decode_tokens(const Vocabulary& vocabulary, const std::int64_t* ids, std::size_t count);
std::string decode_tokens(const Vocabulary& vocabulary, const std::vector<std::int64_t>& ids);

struct TextConvertOptions {
  TokenLevel level = TokenLevel::kChar;
  /// Share of the records held out (is_held_out), in (0, 1). 0.1: 90% of
  /// the fortunes train, 10% validate.
  double val_fraction = 0.1;
  int shards = 4;                 ///< Shard files per split (> 0).
  std::string name = "fortunes";  ///< Data sets NAME-train and NAME-val.

  /// Throws InvalidArgument naming the option.
  void validate() const;
};

/// What convert_text wrote.
struct TextConversion {
  std::vector<std::string> files;  ///< text_source_files(source)
  std::int64_t records = 0;        ///< over all files
  std::int64_t val_records = 0;
  Vocabulary vocabulary;
};

/// Converts the text files of `source` (text_source_files) into the token
/// data sets out_dir/train and out_dir/val (field "tokens"), all or nothing,
/// like convert_fashion_mnist: every file is read and checked first, both
/// splits are written into out_dir/.convert.tmp and then renamed into
/// place, so a failure publishes nothing and a rerun just works; a split
/// already in place is kept if it holds the same tokens and vocabulary.
/// The training split is the text of every record not held out, in order,
/// byte for byte; the held-out split the others. At kChar the vocabulary
/// covers both splits (every held-out character has an id). Throws
/// DataError for a missing source, a file that cannot be read, no text at
/// all or invalid UTF-8 (kChar), InvalidArgument for bad options, a split
/// left without text (too few records for val_fraction), a split with
/// fewer tokens than shards, or an out_dir that holds something else.
TextConversion convert_text(const std::string& source, const std::string& out_dir,
                            const TextConvertOptions& options);

/// Throws DataError, naming the data set, unless field `field` holds one
/// integer token per sample, and, when the manifest has a vocabulary, every
/// value lies in [0, vocabulary size). Cheap (the manifest's recorded range).
void check_token_field(Dataset& dataset, const std::string& field);

}  // namespace dtrain::data
