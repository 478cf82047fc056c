# arm-none-eabi.cmake - CMake toolchain file for bare-metal Cortex-M builds with arm-none-eabi-gcc.
#
#   cmake -S bench/mcu -B build/mcu/m4 -DCMAKE_TOOLCHAIN_FILE=cmake/arm-none-eabi.cmake \
#         -DKDM_CPU=cortex-m4
#
# KDM_CPU picks the core and with it the floating-point ABI and the DSP extension:
#   cortex-m4      -mcpu=cortex-m4 -mfloat-abi=hard -mfpu=fpv4-sp-d16   (DSP: SMLAD and friends)
#   cortex-m7      -mcpu=cortex-m7 -mfloat-abi=hard -mfpu=fpv5-sp-d16   (DSP)
#   cortex-m0plus  -mcpu=cortex-m0plus -mfloat-abi=soft                 (no DSP: reference kernels)
# The DSP extension is implied by -mcpu (GCC then defines __ARM_FEATURE_DSP); nothing is sniffed.
#
# Every build uses newlib-nano (the runtime needs at most memcpy/memset from the C library) and
# puts each function and object in its own section so that --gc-sections drops what is unused.
# Programs bring their own startup code and linker script (bench/mcu), so the compiler checks
# CMake runs at configure time build a static library instead of a linked program.

set(CMAKE_SYSTEM_NAME Generic)
set(CMAKE_SYSTEM_PROCESSOR arm)
set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)

set(KDM_CPU cortex-m4 CACHE STRING "Cortex-M core: cortex-m4, cortex-m7 or cortex-m0plus")
set_property(CACHE KDM_CPU PROPERTY STRINGS cortex-m4 cortex-m7 cortex-m0plus)
# try_compile projects re-read this file; hand them the same core
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES KDM_CPU)

if(KDM_CPU STREQUAL "cortex-m4")
  set(KDM_CPU_FLAGS "-mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16")
elseif(KDM_CPU STREQUAL "cortex-m7")
  set(KDM_CPU_FLAGS "-mcpu=cortex-m7 -mthumb -mfloat-abi=hard -mfpu=fpv5-sp-d16")
elseif(KDM_CPU STREQUAL "cortex-m0plus")
  set(KDM_CPU_FLAGS "-mcpu=cortex-m0plus -mthumb -mfloat-abi=soft")
else()
  message(FATAL_ERROR "KDM_CPU='${KDM_CPU}': use cortex-m4, cortex-m7 or cortex-m0plus")
endif()

find_program(KDM_ARM_GCC arm-none-eabi-gcc)
if(NOT KDM_ARM_GCC)
  message(FATAL_ERROR "arm-none-eabi-gcc not found (Debian: apt-get install gcc-arm-none-eabi "
                      "libnewlib-arm-none-eabi)")
endif()
get_filename_component(KDM_ARM_BIN ${KDM_ARM_GCC} DIRECTORY)

set(CMAKE_C_COMPILER ${KDM_ARM_BIN}/arm-none-eabi-gcc)
set(CMAKE_ASM_COMPILER ${KDM_ARM_BIN}/arm-none-eabi-gcc)
set(CMAKE_AR ${KDM_ARM_BIN}/arm-none-eabi-ar CACHE FILEPATH "archiver")
set(CMAKE_RANLIB ${KDM_ARM_BIN}/arm-none-eabi-ranlib CACHE FILEPATH "ranlib")
set(CMAKE_OBJCOPY ${KDM_ARM_BIN}/arm-none-eabi-objcopy CACHE FILEPATH "objcopy")
set(CMAKE_SIZE ${KDM_ARM_BIN}/arm-none-eabi-size CACHE FILEPATH "size")

set(CMAKE_C_FLAGS_INIT "${KDM_CPU_FLAGS} --specs=nano.specs -ffunction-sections -fdata-sections")
set(CMAKE_ASM_FLAGS_INIT "${KDM_CPU_FLAGS}")
set(CMAKE_C_FLAGS_MINSIZEREL_INIT "-Os -DNDEBUG")
# (the C flags above, nano.specs included, are on the link line too)
set(CMAKE_EXE_LINKER_FLAGS_INIT "-nostartfiles -Wl,--gc-sections")

# headers and libraries come from the cross sysroot only; programs (cmake -P, python) from the host
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
