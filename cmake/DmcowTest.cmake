# dmcow_test(): one line per test binary, in tests/ and daemon/tests/.
#
#   dmcow_test(NAME [SOURCES extra.cc...] [LIBS target...] [LABELS label...]
#              [NEEDS_DMCOW_IMG] [NEEDS_DMCOW_QCOW] [CRASH_ENV] [HEAP_PEAK])
#
# Builds NAME from NAME.cc (plus SOURCES) against the engine and the shared
# test helpers (tests/test_util.h), with the engine's private headers on the
# include path (tests include "qcow2/qcow2_overlap.h", the file's room under
# qcow/src, never "../qcow/src/..."),
# and registers it with CTest.
#   NEEDS_DMCOW_IMG   defines DMCOW_IMG_PATH (test_util.h then offers
#                     kDmcowImg and Ours()) and builds dmcow-img first.
#   NEEDS_DMCOW_QCOW  defines DMCOW_QCOW_PATH and DMCOWD_PATH likewise.
#   CRASH_ENV         links the crash and fault layer (tests/crash_env.h).
#   HEAP_PEAK         links the allocation counter (tests/heap_peak.h).
# A test case that cannot run here (a tool missing) calls DMCOW_SKIP or
# SKIP_WITHOUT_QEMU; the binary then exits 77, which CTest reports as
# skipped, never as passed, and scripts/test.sh fails on any skip.
set(DMCOW_TEST_SKIP_CODE 77)

function(dmcow_test name)
  cmake_parse_arguments(T "NEEDS_DMCOW_IMG;NEEDS_DMCOW_QCOW;CRASH_ENV;HEAP_PEAK" "" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${name}.cc ${T_SOURCES})
  target_link_libraries(${name} PRIVATE dmcow_qcow dmcow_test_util ${T_LIBS})
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR}/tests ${PROJECT_SOURCE_DIR}/qcow/src)
  if(T_CRASH_ENV)
    target_link_libraries(${name} PRIVATE dmcow_crash_env)
  endif()
  if(T_HEAP_PEAK)
    target_link_libraries(${name} PRIVATE dmcow_heap_peak)
  endif()
  if(T_NEEDS_DMCOW_IMG)
    target_compile_definitions(${name} PRIVATE DMCOW_IMG_PATH="$<TARGET_FILE:dmcow-img>")
    add_dependencies(${name} dmcow-img)
  endif()
  if(T_NEEDS_DMCOW_QCOW)
    target_compile_definitions(${name} PRIVATE DMCOW_QCOW_PATH="$<TARGET_FILE:dmcow-qcow>"
                                               DMCOWD_PATH="$<TARGET_FILE:dmcowd>")
    add_dependencies(${name} dmcow-qcow dmcowd)
  endif()
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES SKIP_RETURN_CODE ${DMCOW_TEST_SKIP_CODE})
  if(T_LABELS)
    set_tests_properties(${name} PROPERTIES LABELS "${T_LABELS}")
  endif()
endfunction()
