# Compile options applied through targets only (no global flags).
add_library(dtrain_warnings INTERFACE)
target_compile_options(dtrain_warnings INTERFACE -Wall -Wextra -Wpedantic -Wno-unused-parameter)
if(DTRAIN_WERROR)
  target_compile_options(dtrain_warnings INTERFACE -Werror)
endif()

add_library(dtrain_sanitizers INTERFACE)
if(DTRAIN_SANITIZE)
  target_compile_options(dtrain_sanitizers INTERFACE -fsanitize=${DTRAIN_SANITIZE} -fno-omit-frame-pointer)
  target_link_options(dtrain_sanitizers INTERFACE -fsanitize=${DTRAIN_SANITIZE})
endif()
