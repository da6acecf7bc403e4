# Imported target dwdp::nvshmem pointing into the nvidia-nvshmem-cu{12,13} wheel (which ships no CMake package and
# no unversioned host library). Search order: -DNVSHMEM_HOME, $NVSHMEM_HOME, then the wheel importable by the
# Python that runs the build (the build requirement pins nvidia-nvshmem-cu13 to the release PyTorch uses).
# Sets DWDP_NVSHMEM_LIB_DIR, DWDP_NVSHMEM_VERSION (from the headers), DWDP_NVSHMEM_WHEEL and
# DWDP_NVSHMEM_WHEEL_VERSION (empty for NVSHMEM_HOME); the build writes them into dwdp_ops/_build_info.json, which
# dwdp_ops._native compares with the host library loaded at run time.
include(${CMAKE_CURRENT_LIST_DIR}/dwdp_checks.cmake)

set(NVSHMEM_HOME "$ENV{NVSHMEM_HOME}" CACHE PATH "NVSHMEM root (holds include/ and lib/); empty = the pip wheel")
set(DWDP_NVSHMEM_WHEEL "")
set(DWDP_NVSHMEM_WHEEL_VERSION "")
if(NOT NVSHMEM_HOME)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.metadata as md, nvidia.nvshmem as m\nprint(list(m.__path__)[0])\nfor d in ('nvidia-nvshmem-cu13', 'nvidia-nvshmem-cu12'):\n    try:\n        print(d, md.version(d))\n    except md.PackageNotFoundError: pass"
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR
      "dwdp_ops needs NVSHMEM and found none: `import nvidia.nvshmem` failed in ${Python_EXECUTABLE}.\n"
      "Install the wheel that matches your CUDA major version (pip install nvidia-nvshmem-cu13==3.4.5, or -cu12), "
      "or point NVSHMEM_HOME at an NVSHMEM install.")
  endif()
  string(REPLACE "\n" ";" _lines "${_out}")
  list(POP_FRONT _lines NVSHMEM_HOME)
  dwdp_check_one_wheel("${_lines}")
  if(_lines)
    string(REPLACE " " ";" _dist "${_lines}")
    list(GET _dist 0 DWDP_NVSHMEM_WHEEL)
    list(GET _dist 1 DWDP_NVSHMEM_WHEEL_VERSION)
  endif()
endif()

set(_inc "${NVSHMEM_HOME}/include")
set(_dev "${NVSHMEM_HOME}/lib/libnvshmem_device.a")
find_file(_host NAMES libnvshmem_host.so.3 libnvshmem_host.so PATHS "${NVSHMEM_HOME}/lib" NO_DEFAULT_PATH NO_CACHE)
if(NOT EXISTS "${_inc}/nvshmem.h" OR NOT EXISTS "${_dev}" OR NOT _host)
  message(FATAL_ERROR
    "NVSHMEM at '${NVSHMEM_HOME}' is incomplete: need include/nvshmem.h, lib/libnvshmem_device.a and "
    "lib/libnvshmem_host.so.3. Reinstall nvidia-nvshmem-cu13 or fix NVSHMEM_HOME.")
endif()

file(STRINGS "${_inc}/non_abi/nvshmem_version.h" _ver REGEX "define NVSHMEM_VENDOR_(MAJOR|MINOR|PATCH)_VERSION")
string(REGEX MATCH "MAJOR_VERSION ([0-9]+)" _m "${_ver}")
set(NVSHMEM_VERSION_MAJOR ${CMAKE_MATCH_1})
string(REGEX MATCH "MINOR_VERSION ([0-9]+)" _m "${_ver}")
set(NVSHMEM_VERSION_MINOR ${CMAKE_MATCH_1})
string(REGEX MATCH "PATCH_VERSION ([0-9]+)" _m "${_ver}")
set(NVSHMEM_VERSION_PATCH ${CMAKE_MATCH_1})
set(DWDP_NVSHMEM_VERSION "${NVSHMEM_VERSION_MAJOR}.${NVSHMEM_VERSION_MINOR}.${NVSHMEM_VERSION_PATCH}")
if(NOT NVSHMEM_VERSION_MAJOR EQUAL 3 OR NVSHMEM_VERSION_MINOR LESS 4)
  message(FATAL_ERROR "dwdp_ops supports NVSHMEM >=3.4,<4; found ${DWDP_NVSHMEM_VERSION} at ${NVSHMEM_HOME}")
endif()

dwdp_check_cuda_major("${DWDP_NVSHMEM_WHEEL}" "${CMAKE_CUDA_COMPILER_VERSION}" "${DWDP_NVSHMEM_VERSION}")

get_filename_component(DWDP_NVSHMEM_LIB_DIR "${_host}" DIRECTORY)
add_library(dwdp::nvshmem INTERFACE IMPORTED)
target_include_directories(dwdp::nvshmem INTERFACE "${_inc}")
target_link_libraries(dwdp::nvshmem INTERFACE "${_dev}" "${_host}")
message(STATUS "dwdp_ops: NVSHMEM ${DWDP_NVSHMEM_VERSION} from ${NVSHMEM_HOME} ${DWDP_NVSHMEM_WHEEL}")
