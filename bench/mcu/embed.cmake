# embed.cmake - write a binary file as C data, for firmware that carries its test inputs:
#   cmake -DIN=samples.bin -DOUT=samples_blob.c -DNAME=fw_samples -P embed.cmake
# gives `const uint8_t NAME[]` (4-byte aligned, every byte of IN) and `const uint32_t NAME_len`.
if(NOT IN OR NOT OUT OR NOT NAME)
  message(FATAL_ERROR "usage: cmake -DIN=file -DOUT=file.c -DNAME=symbol -P embed.cmake")
endif()
file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" digits)
math(EXPR bytes "${digits} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," body "${hex}")
# 16 bytes a line (CMake regular expressions have no {n} repetition)
set(row "")
foreach(i RANGE 15)
  string(APPEND row "0x[0-9a-f][0-9a-f],")
endforeach()
string(REGEX REPLACE "(${row})" "\\1\n    " body "${body}")
get_filename_component(src "${IN}" NAME)
file(WRITE "${OUT}.tmp"
  "/* ${src} embedded by bench/mcu/embed.cmake */\n#include <stdint.h>\n\n"
  "const uint8_t ${NAME}[${bytes} + 1] __attribute__((aligned(4))) = {\n    ${body}0};\n"
  "const uint32_t ${NAME}_len = ${bytes}u;\n")
file(RENAME "${OUT}.tmp" "${OUT}")
