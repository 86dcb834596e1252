"""The files a learner starts from: each is a solution with its blank replaced by
`raise NotImplementedError("your code here")`. `minqkv exercise start NAME` copies one out."""
