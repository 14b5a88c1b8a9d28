/* Embedding mistral-trt in a C program: open an export, stream a reply, close (docs/cpp.md).
 *   embed EXPORT_DIR "Why is the sky blue?"     a chat-formatted user message
 *   embed EXPORT_DIR --ids 1,2,3                prompt ids (models whose tokenizer the C++ runtime cannot encode) */
#include <mistral_trt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int on_token(void* user, int64_t id, const char* text, size_t len) {
  (void)user, (void)id;
  fwrite(text, 1, len, stdout);
  fflush(stdout);
  return 0; /* non-zero would stop here */
}

int main(int argc, char** argv) {
  if (argc < 3) return fprintf(stderr, "usage: embed EXPORT_DIR PROMPT | --ids 1,2,3\n"), 2;
  mtrt_model* m = mtrt_open(argv[1]);
  if (!m) return fprintf(stderr, "embed: error: %s\n", mtrt_last_error()), 2;
  int64_t ids[8192];
  size_t n = 0;
  if (strcmp(argv[2], "--ids") == 0 && argc > 3) {
    for (char* p = strtok(argv[3], ","); p && n < 8192; p = strtok(NULL, ",")) ids[n++] = strtoll(p, NULL, 10);
  } else if (mtrt_tokenize(m, MTRT_PROMPT, argv[2], ids, 8192, &n) != MTRT_OK) {
    fprintf(stderr, "embed: error: %s\n", mtrt_last_error());
    return mtrt_close(m), 2;
  }
  mtrt_params p;
  mtrt_default_params(&p); /* greedy */
  p.max_new_tokens = 32;
  mtrt_stats st;
  int rc = mtrt_generate(m, ids, n, &p, on_token, NULL, &st, NULL);
  if (rc != MTRT_OK) fprintf(stderr, "embed: error: %s\n", mtrt_last_error());
  else printf("\n[%d prompt tokens, %d new, %.1f tokens/s]\n", st.prompt_tokens, st.new_tokens, st.decode_tokens_per_s);
  mtrt_close(m);
  return rc;
}
