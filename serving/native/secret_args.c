/* Keep the admin key out of tritonserver's command line.
 *
 * tritonserver takes its restricted-API key only as an argument, and every local user can read a
 * process's arguments (/proc/<pid>/cmdline). `fire serve` therefore passes the placeholder
 * @FIRE_ADMIN_KEY@ in the arguments and the key in the environment (readable by the same user and
 * root only), and preloads this library: before main() runs, it points each argument that holds the
 * placeholder at a copy with the key substituted. /proc/<pid>/cmdline still shows the placeholder;
 * tritonserver parses the key. It then removes the key and itself from the environment, so the
 * Python-backend stubs the server starts inherit neither. The launcher checks afterwards that the
 * placeholder is refused as a key (a server that started without this library would accept it).
 */
#include <stdlib.h>
#include <string.h>

#define MARK "@FIRE_ADMIN_KEY@"

static void fire_secret_args(int argc, char **argv, char **envp) {
    (void)envp;
    const char *key = getenv("FIRE_ADMIN_KEY");
    if (key != NULL && argv != NULL) {
        size_t mark = strlen(MARK), klen = strlen(key);
        for (int i = 0; i < argc; i++) {
            char *at = strstr(argv[i], MARK);
            if (at == NULL) continue;
            size_t head = (size_t)(at - argv[i]);
            char *s = malloc(strlen(argv[i]) - mark + klen + 1);
            if (s == NULL) abort();
            memcpy(s, argv[i], head);
            memcpy(s + head, key, klen);
            strcpy(s + head + klen, at + mark);
            argv[i] = s;
        }
    }
    unsetenv("FIRE_ADMIN_KEY");
    unsetenv("LD_PRELOAD");
}

__attribute__((section(".init_array"), used)) static void (*fire_secret_args_init)(int, char **, char **) =
    fire_secret_args;
