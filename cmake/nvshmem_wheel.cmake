# Imported target dwdp::nvshmem pointing into the nvidia-nvshmem-cu{12,13} wheel (which ships no CMake package and
# no unversioned host library). Search order: -DNVSHMEM_HOME, $NVSHMEM_HOME, then the wheel importable by the
# Python that runs the build.
set(NVSHMEM_HOME "$ENV{NVSHMEM_HOME}" CACHE PATH "NVSHMEM root (holds include/ and lib/); empty = the pip wheel")
set(_dwdp_wheel_dist "")
if(NOT NVSHMEM_HOME)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.metadata as md, nvidia.nvshmem as m\nprint(list(m.__path__)[0])\nfor d in ('nvidia-nvshmem-cu13', 'nvidia-nvshmem-cu12'):\n    try:\n        print(d, md.version(d)); break\n    except md.PackageNotFoundError: pass"
    RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR
      "dwdp_ops needs NVSHMEM and found none: `import nvidia.nvshmem` failed in ${Python_EXECUTABLE}.\n"
      "Install the wheel that matches your CUDA major version (pip install 'nvidia-nvshmem-cu13>=3.4,<4'), "
      "or point NVSHMEM_HOME at an NVSHMEM install.")
  endif()
  string(REPLACE "\n" ";" _lines "${_out}")
  list(GET _lines 0 NVSHMEM_HOME)
  list(LENGTH _lines _n)
  if(_n GREATER 1)
    list(GET _lines 1 _dwdp_wheel_dist)
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
if(NOT NVSHMEM_VERSION_MAJOR EQUAL 3 OR NVSHMEM_VERSION_MINOR LESS 4)
  message(FATAL_ERROR "dwdp_ops supports NVSHMEM >=3.4,<4; found ${NVSHMEM_VERSION_MAJOR}.${NVSHMEM_VERSION_MINOR} at ${NVSHMEM_HOME}")
endif()

string(REGEX MATCH "^([0-9]+)" _cuda_major "${CMAKE_CUDA_COMPILER_VERSION}")
if(_dwdp_wheel_dist MATCHES "cu([0-9]+)" AND NOT CMAKE_MATCH_1 STREQUAL _cuda_major)
  message(FATAL_ERROR
    "NVSHMEM wheel '${_dwdp_wheel_dist}' is built for CUDA ${CMAKE_MATCH_1} but nvcc is CUDA "
    "${CMAKE_CUDA_COMPILER_VERSION}. Install nvidia-nvshmem-cu${_cuda_major} (the dwdp_ops[cu${_cuda_major}] extra).")
endif()

get_filename_component(DWDP_NVSHMEM_LIB_DIR "${_host}" DIRECTORY)
add_library(dwdp::nvshmem INTERFACE IMPORTED)
target_include_directories(dwdp::nvshmem INTERFACE "${_inc}")
target_link_libraries(dwdp::nvshmem INTERFACE "${_dev}" "${_host}")
message(STATUS "dwdp_ops: NVSHMEM ${NVSHMEM_VERSION_MAJOR}.${NVSHMEM_VERSION_MINOR} from ${NVSHMEM_HOME} ${_dwdp_wheel_dist}")
