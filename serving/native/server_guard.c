/* Keep the keys out of tritonserver's command line, and its shared memory private.
 *
 * tritonserver takes its restricted-API keys only as arguments, and every local user can read a
 * process's arguments (/proc/<pid>/cmdline). `fire serve` therefore passes placeholders
 * (@FIRE_ADMIN_KEY@, @FIRE_INFERENCE_KEY@) in the arguments and the keys in the environment (readable
 * by the same user and root only), and preloads this library: before main() runs, it points each
 * argument that holds a placeholder at a copy with the key substituted. /proc/<pid>/cmdline still
 * shows the placeholders; tritonserver parses the keys. It then removes the keys and itself from the
 * environment, so the Python-backend stubs the server starts inherit none. The launcher checks
 * afterwards that each placeholder is refused as a key (a server started without this library would
 * accept it).
 *
 * Second: the Python backend creates its shared-memory regions in /dev/shm (tensors in flight) and
 * sets their mode to 0644 with fchmod, whatever the umask: readable by every local user. Within the
 * server process, this library's fchmod drops the group and other bits, so the regions are 0600.
 *
 * Third: the server must not outlive its launcher. A launcher killed with SIGKILL (the OOM killer, a
 * forced stop) cannot stop its server, which would keep the ports, the shared memory and whatever it
 * served. With FIRE_PARENT_PID set, the server asks the kernel for SIGTERM when its parent goes (a
 * graceful shutdown; the stubs follow their server), and exits at once if the parent is already gone.
 * (The kernel sends it when the launcher's thread that started the server ends: launchers start it
 * from their main thread.)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

int fchmod(int fd, mode_t mode) {
    static int (*real_fchmod)(int, mode_t) = NULL;
    if (real_fchmod == NULL) real_fchmod = (int (*)(int, mode_t))dlsym(RTLD_NEXT, "fchmod");
    return real_fchmod(fd, mode & ~(mode_t)(S_IRWXG | S_IRWXO));
}

/* placeholder in the arguments -> environment variable holding the key */
static const char *const KEYS[][2] = {
    {"@FIRE_ADMIN_KEY@", "FIRE_ADMIN_KEY"},
    {"@FIRE_INFERENCE_KEY@", "FIRE_INFERENCE_KEY"},
};

static void substitute(int argc, char **argv, const char *mark, const char *key) {
    size_t mlen = strlen(mark), klen = strlen(key);
    for (int i = 0; i < argc; i++) {
        char *at = strstr(argv[i], mark);
        if (at == NULL) continue;
        size_t head = (size_t)(at - argv[i]);
        char *s = malloc(strlen(argv[i]) - mlen + klen + 1);
        if (s == NULL) abort();
        memcpy(s, argv[i], head);
        memcpy(s + head, key, klen);
        strcpy(s + head + klen, at + mlen);
        argv[i] = s;
    }
}

static void fire_server_guard(int argc, char **argv, char **envp) {
    (void)envp;
    for (size_t k = 0; k < sizeof(KEYS) / sizeof(KEYS[0]); k++) {
        const char *key = getenv(KEYS[k][1]);
        if (key != NULL && argv != NULL) substitute(argc, argv, KEYS[k][0], key);
        unsetenv(KEYS[k][1]);
    }
    unsetenv("LD_PRELOAD");
    const char *parent = getenv("FIRE_PARENT_PID");
    if (parent != NULL) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if ((pid_t)atol(parent) != getppid()) _exit(1); /* the launcher died before the request took */
        unsetenv("FIRE_PARENT_PID");
    }
}

__attribute__((section(".init_array"), used)) static void (*fire_server_guard_init)(int, char **, char **) =
    fire_server_guard;
