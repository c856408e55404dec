"""The per-row stopping criterion of batched generation, with a character tokenizer (no model)."""
import torch

from fastpeft.serve.inference import GenerateItem, RowStopper


class CharTok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _run(items, text_per_row, eos=()):
    """Feed each row's text one character (token) per step, as generate() would; returns the stopper and
    what each row streamed."""
    streamed = [[] for _ in items]
    for i, it in enumerate(items):
        it.on_text = streamed[i].append
    st = RowStopper(CharTok(), 1, items, set(eos))
    steps = max(len(t) for t in text_per_row)
    done = None
    for k in range(1, steps + 1):
        ids = torch.tensor([[0] + [ord(c) for c in t[:k]] + [0] * (k - len(t[:k])) for t in text_per_row])
        done = st(ids)
        if bool(done.all()):
            break
    st.close()
    return st, streamed, done


def test_rows_stop_on_their_own_conditions_and_stream_only_final_text():
    items = [GenerateItem("a", [0], max_tokens=4),                      # length
             GenerateItem("b", [0], max_tokens=50, stop=["END"]),       # stop string, spread over tokens
             GenerateItem("c", [0], max_tokens=50),                     # EOS token
             GenerateItem("d", [0], max_tokens=50, stop=["zz", "y!"])]  # earliest stop string wins
    texts = ["abcdefgh", "hello ENDmore", "hi\x01xx", "wxy!zz..."]
    st, streamed, _ = _run(items, texts, eos={1})
    assert st.text == ["abcd", "hello ", "hi", "wx"]
    assert st.finish == ["length", "stop", "stop", "stop"]
    for i in range(4):
        assert "".join(streamed[i]) == st.text[i]        # no piece of a stop string was ever sent
    assert st.n_tokens[0] == 4 and st.n_tokens[2] == 3   # EOS counts as a generated token


def test_cancelled_row_stops():
    it = GenerateItem("a", [0], max_tokens=50)
    st = RowStopper(CharTok(), 1, [it], set())
    assert not bool(st(torch.tensor([[0, 97]]))[0])
    it.cancelled = True
    assert bool(st(torch.tensor([[0, 97, 98]]))[0]) and st.finish == ["cancelled"]
