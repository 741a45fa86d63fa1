// Clang's thread-safety attributes (-Wthread-safety), as LevelDB's
// port/thread_annotations.h: which mutex guards a member, which a function
// needs held. They compile to nothing elsewhere; the clang build (the fuzz
// build, scripts/build.sh fuzz) checks them as errors.
#ifndef DMCOW_THREAD_ANNOTATIONS_H_
#define DMCOW_THREAD_ANNOTATIONS_H_

#if defined(__clang__)
#define DMCOW_THREAD_ANNOTATION(x) __attribute__((x))
#else
#define DMCOW_THREAD_ANNOTATION(x)
#endif

#define CAPABILITY(x) DMCOW_THREAD_ANNOTATION(capability(x))
#define SCOPED_CAPABILITY DMCOW_THREAD_ANNOTATION(scoped_lockable)
#define GUARDED_BY(x) DMCOW_THREAD_ANNOTATION(guarded_by(x))
#define PT_GUARDED_BY(x) DMCOW_THREAD_ANNOTATION(pt_guarded_by(x))
#define REQUIRES(...) DMCOW_THREAD_ANNOTATION(requires_capability(__VA_ARGS__))
#define REQUIRES_SHARED(...) DMCOW_THREAD_ANNOTATION(requires_shared_capability(__VA_ARGS__))
#define ACQUIRE(...) DMCOW_THREAD_ANNOTATION(acquire_capability(__VA_ARGS__))
#define ACQUIRE_SHARED(...) DMCOW_THREAD_ANNOTATION(acquire_shared_capability(__VA_ARGS__))
#define RELEASE(...) DMCOW_THREAD_ANNOTATION(release_capability(__VA_ARGS__))
#define RELEASE_SHARED(...) DMCOW_THREAD_ANNOTATION(release_shared_capability(__VA_ARGS__))
#define EXCLUDES(...) DMCOW_THREAD_ANNOTATION(locks_excluded(__VA_ARGS__))
#define ASSERT_CAPABILITY(x) DMCOW_THREAD_ANNOTATION(assert_capability(x))
#define ASSERT_SHARED_CAPABILITY(x) DMCOW_THREAD_ANNOTATION(assert_shared_capability(x))
#define NO_THREAD_SAFETY_ANALYSIS DMCOW_THREAD_ANNOTATION(no_thread_safety_analysis)

#endif  // DMCOW_THREAD_ANNOTATIONS_H_
