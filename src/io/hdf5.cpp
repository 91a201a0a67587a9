#include "src/io/hdf5.h"

#include <string>
#include <vector>

namespace dtrain::io {

ErrorScope::ErrorScope() {
  H5Eget_auto2(H5E_DEFAULT, &old_func_, &old_data_);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

ErrorScope::~ErrorScope() { H5Eset_auto2(H5E_DEFAULT, old_func_, old_data_); }

namespace {
herr_t collect(unsigned, const H5E_error2_t* err, void* data) {
  auto* out = static_cast<std::vector<std::string>*>(data);
  if (err != nullptr && err->desc != nullptr && err->desc[0] != '\0') {
    out->push_back(std::string(err->func_name ? err->func_name : "?") + ": " + err->desc);
  }
  return 0;
}
}  // namespace

std::string error_stack_text() {
  std::vector<std::string> messages;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect, &messages);
  H5Eclear2(H5E_DEFAULT);
  std::string text;
  // The innermost few messages say what actually went wrong.
  const std::size_t keep = messages.size() < 3 ? messages.size() : 3;
  for (std::size_t i = messages.size() - keep; i < messages.size(); ++i) {
    if (!text.empty()) text += "; ";
    text += messages[i];
  }
  return text.empty() ? "no HDF5 error message" : text;
}

std::string error_message(const std::string& what, const std::string& file,
                          const std::string& object) {
  std::string msg = what + " failed for " + file;
  if (!object.empty()) msg += " field '" + object + "'";
  return msg + ": " + error_stack_text();
}

}  // namespace dtrain::io
