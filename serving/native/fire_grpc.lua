-- FIRE gateway, gRPC: which model does a KServe v2 gRPC request name?
--
-- ModelInfer / ModelReady / ModelMetadata / ModelConfig requests carry the model's name in protobuf
-- field 1. Protobuf lets a field repeat (the last value wins), so reading a prefix is not enough: this
-- walks every top-level field of the one, complete, uncompressed gRPC message in the body and sets
-- txn.fire_model only when field 1 occurs exactly once. Anything else (compressed, truncated by the
-- gateway's buffer, several messages, malformed, field 1 absent or repeated) leaves it empty, and the
-- gateway refuses the request: fail closed.

local function varint(s, pos, stop)
  local value, shift = 0, 0
  while pos <= stop do
    local b = s:byte(pos)
    pos = pos + 1
    value = value | ((b & 0x7f) << shift)
    if b < 0x80 then return value, pos end
    shift = shift + 7
    if shift > 63 then return nil, pos end
  end
  return nil, pos
end

local function model_name(body)
  if body == nil or #body < 5 or body:byte(1) ~= 0 then return nil end  -- byte 1: compressed flag
  local length = (body:byte(2) << 24) | (body:byte(3) << 16) | (body:byte(4) << 8) | body:byte(5)
  if #body ~= 5 + length then return nil end                            -- exactly one whole message
  local pos, stop, name, seen = 6, 5 + length, nil, 0
  while pos <= stop do
    local key
    key, pos = varint(body, pos, stop)
    if key == nil then return nil end
    local field, wire = key >> 3, key & 7
    if wire == 0 then
      local v
      v, pos = varint(body, pos, stop)
      if v == nil then return nil end
    elseif wire == 1 then
      pos = pos + 8
    elseif wire == 2 then
      local n
      n, pos = varint(body, pos, stop)
      if n == nil or pos + n - 1 > stop then return nil end
      if field == 1 then
        name = body:sub(pos, pos + n - 1)
        seen = seen + 1
      end
      pos = pos + n
    elseif wire == 5 then
      pos = pos + 4
    else
      return nil                                                        -- groups: not in these messages
    end
    if pos > stop + 1 then return nil end
  end
  if seen ~= 1 then return nil end
  return name
end

core.register_action("fire_grpc_model", { "http-req" }, function(txn)
  txn:set_var("txn.fire_model", model_name(txn.f:req_body()) or "")
end, 0)
