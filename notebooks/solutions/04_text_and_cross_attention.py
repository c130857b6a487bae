# Reference solution for notebooks/04_text_and_cross_attention.ipynb: one head's attention
# weights softmax(Q K^T / sqrt(d)), (HW, T), for item 0 of the batch, for any attn2 layer.
def my_head_weights(attn, x, ctx, head):
    d = attn.to_q.out_features // attn.heads  # the size of one head, not the layer's width
    cols = slice(head * d, (head + 1) * d)  # head `head`'s channels of Q and K
    q = attn.to_q(x)[0, :, cols]  # (HW, d)
    k = attn.to_k(ctx)[0, :, cols]  # (T, d)
    return (q @ k.T / d**0.5).softmax(dim=-1)  # (HW, T): each pixel's weights over the tokens
