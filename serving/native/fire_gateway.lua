-- FIRE gateway: read each request the way Triton will read it, or refuse it.
--
-- HAProxy runs this before a request reaches Triton. It decides which model a request names and
-- whether what it carries fits that model's config, so that nothing the gateway lets through can
-- name another model than the one it checked, or make Triton allocate more than a valid request needs.
--
-- gRPC (KServe v2 over HTTP/2): the one, whole, uncompressed message of a ModelInfer, ModelReady,
-- ModelMetadata or ModelConfig call is parsed as protobuf, strictly: canonical varints only (no
-- over-long encodings: protobuf C++ truncates an over-long tag to 32 bits, upb refuses it, so the two
-- disagree on what such a request names), field numbers 1..2^29-1, the wire type each field has in
-- Triton's grpc_service.proto, no unknown fields, every singular field at most once, lengths that fit.
-- HTTP: the JSON inference header (the whole body, or the first Inference-Header-Content-Length bytes
-- of it) is parsed strictly: no duplicate keys, no unknown keys, integers as integers.
-- Then, for an inference: every input of the model exactly once with its datatype, a shape that fits
-- the config (batch 1..max_batch_size, fixed dims equal, variable dims bounded), and exactly the bytes
-- (or JSON values) that shape holds; only the model's outputs; only allowed parameters.
--
-- The models and their configs come from FIRE_GATEWAY_SPEC, a JSON text that the generated
-- configuration loads first (`fire gateway` writes both). Results, as transaction variables:
--   txn.fire_model  the model the request names, set only when the request may pass
--   txn.fire_why    else why not (one line, printable ASCII)

local DTYPE_SIZE = { BOOL = 1, UINT8 = 1, INT8 = 1, UINT16 = 2, INT16 = 2, FP16 = 2, BF16 = 2,
                     UINT32 = 4, INT32 = 4, FP32 = 4, UINT64 = 8, INT64 = 8, FP64 = 8 }

-- Request parameters a client may set (Triton's own; "fire-*" ones come only from the gateway).
local REQUEST_PARAMETERS = { priority = "int", timeout = "int", binary_data_output = "bool" }
local OUTPUT_PARAMETERS = { binary_data = "bool", classification = "int" }

local function fail(why) return nil, why end

---------------------------------------------------------------------------------------------------
-- Strict JSON
---------------------------------------------------------------------------------------------------

local MAX_DEPTH = 32
local json_value

local function skip_ws(s, pos)
  return s:find("[^ \t\r\n]", pos) or #s + 1
end

local function json_string(s, pos)
  -- pos at the opening quote; returns the decoded string (escapes refused but the plain ones) and the
  -- position after the closing quote
  local out, i = {}, pos + 1
  while true do
    local j = s:find('["\\%c]', i)
    if j == nil then return fail("unterminated JSON string") end
    local c = s:sub(j, j)
    out[#out + 1] = s:sub(i, j - 1)
    if c == '"' then return table.concat(out), j + 1 end
    if c ~= "\\" then return fail("control character in a JSON string") end
    local e = s:sub(j + 1, j + 1)
    local simple = ({ ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t" })[e]
    if simple then
      out[#out + 1] = simple
      i = j + 2
    elseif e == "u" then
      local hex = s:match("^%x%x%x%x", j + 2)
      if hex == nil then return fail("bad \\u escape in a JSON string") end
      local code = tonumber(hex, 16)
      if code < 0x20 or code > 0x7e then return fail("non-ASCII \\u escape in a JSON string") end
      out[#out + 1] = string.char(code)
      i = j + 6
    else
      return fail("bad escape in a JSON string")
    end
  end
end

local function json_number(s, pos)
  -- exactly JSON's grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][-+]?[0-9]+)?
  local i = pos
  if s:sub(i, i) == "-" then i = i + 1 end
  local int = s:match("^%d+", i)
  if int == nil then return fail("bad JSON value") end
  if #int > 1 and int:sub(1, 1) == "0" then return fail("bad JSON number (leading zero)") end
  i = i + #int
  local integral = true
  if s:sub(i, i) == "." then
    local frac = s:match("^%d+", i + 1)
    if frac == nil then return fail("bad JSON number") end
    i, integral = i + 1 + #frac, false
  end
  local e = s:sub(i, i)
  if e == "e" or e == "E" then
    local j = i + 1
    local sign = s:sub(j, j)
    if sign == "+" or sign == "-" then j = j + 1 end
    local exp = s:match("^%d+", j)
    if exp == nil then return fail("bad JSON number") end
    i, integral = j + #exp, false
  end
  local literal = s:sub(pos, i - 1)
  if integral then
    if #literal > 16 then return fail("JSON integer too large") end
    return math.tointeger(tonumber(literal)), i
  end
  return tonumber(literal), i
end

local function json_array(s, pos, depth)
  local arr, n = {}, 0
  pos = skip_ws(s, pos + 1)
  if s:sub(pos, pos) == "]" then return arr, pos + 1 end
  while true do
    local v
    v, pos = json_value(s, pos, depth + 1)
    if v == nil then return nil, pos end
    n = n + 1
    arr[n] = v
    pos = skip_ws(s, pos)
    local c = s:sub(pos, pos)
    if c == "]" then return arr, pos + 1 end
    if c ~= "," then return fail("expected ',' or ']' in a JSON array") end
    pos = skip_ws(s, pos + 1)
  end
end

local OBJECT = {}  -- metatable marking objects (an empty object is not an empty array)

local function json_object(s, pos, depth)
  local obj = setmetatable({}, OBJECT)
  pos = skip_ws(s, pos + 1)
  if s:sub(pos, pos) == "}" then return obj, pos + 1 end
  while true do
    if s:sub(pos, pos) ~= '"' then return fail("expected a key in a JSON object") end
    local key
    key, pos = json_string(s, pos)
    if key == nil then return nil, pos end
    if obj[key] ~= nil then return fail("duplicate JSON key '" .. key:gsub("[^%w_.-]", "?") .. "'") end
    pos = skip_ws(s, pos)
    if s:sub(pos, pos) ~= ":" then return fail("expected ':' in a JSON object") end
    local v
    v, pos = json_value(s, skip_ws(s, pos + 1), depth + 1)
    if v == nil then return nil, pos end
    obj[key] = v
    pos = skip_ws(s, pos)
    local c = s:sub(pos, pos)
    if c == "}" then return obj, pos + 1 end
    if c ~= "," then return fail("expected ',' or '}' in a JSON object") end
    pos = skip_ws(s, pos + 1)
  end
end

local NULL = setmetatable({}, { __name = "null" })

json_value = function(s, pos, depth)
  if depth > MAX_DEPTH then return fail("JSON nested too deeply") end
  local c = s:sub(pos, pos)
  if c == "{" then return json_object(s, pos, depth) end
  if c == "[" then return json_array(s, pos, depth) end
  if c == '"' then return json_string(s, pos) end
  if s:sub(pos, pos + 3) == "true" then return true, pos + 4 end
  if s:sub(pos, pos + 4) == "false" then return false, pos + 5 end
  if s:sub(pos, pos + 3) == "null" then return NULL, pos + 4 end
  return json_number(s, pos)
end

local function json_decode(s)
  local v, pos = json_value(s, skip_ws(s, 1), 0)
  if v == nil then return nil, pos end
  if skip_ws(s, pos) <= #s then return fail("trailing bytes after the JSON value") end
  return v
end

local function is_object(v) return type(v) == "table" and getmetatable(v) == OBJECT end
local function is_array(v) return type(v) == "table" and getmetatable(v) == nil end

---------------------------------------------------------------------------------------------------
-- The spec: which models pass, and their configs
---------------------------------------------------------------------------------------------------

local SPEC = nil

local function load_spec()
  if FIRE_GATEWAY_SPEC == nil then error("FIRE gateway: FIRE_GATEWAY_SPEC is not set (load the spec file first)") end
  local spec, why = json_decode(FIRE_GATEWAY_SPEC)
  if spec == nil then error("FIRE gateway: the spec does not parse: " .. why) end
  SPEC = spec
end

---------------------------------------------------------------------------------------------------
-- Shapes and sizes against a model's config
---------------------------------------------------------------------------------------------------

-- The number of elements ``shape`` holds, if it fits input ``cfg`` of a model with ``max_batch``.
local function check_shape(shape, cfg, max_batch)
  local dims = cfg.dims
  local offset = max_batch > 0 and 1 or 0
  if #shape ~= #dims + offset then
    return fail("input '" .. cfg.name .. "': shape has " .. #shape .. " dims, the model takes " .. (#dims + offset))
  end
  local elements = 1
  for i, d in ipairs(shape) do
    if math.type(d) ~= "integer" then return fail("input '" .. cfg.name .. "': a dim is not an integer") end
    if i == 1 and offset == 1 then
      if d < 1 or d > max_batch then
        return fail("input '" .. cfg.name .. "': batch " .. d .. " outside 1.." .. max_batch)
      end
    else
      local want = dims[i - offset]
      if want >= 0 and d ~= want then
        return fail("input '" .. cfg.name .. "': dim " .. (i - 1) .. " is " .. d .. ", the model takes " .. want)
      end
      if want < 0 and (d < 1 or d > SPEC.max_dim) then
        return fail("input '" .. cfg.name .. "': dim " .. (i - 1) .. " outside 1.." .. SPEC.max_dim)
      end
    end
    elements = elements * d
    if elements > SPEC.max_elements then
      return fail("input '" .. cfg.name .. "': more than " .. SPEC.max_elements .. " elements")
    end
  end
  return elements
end

local function input_config(model, name)
  for _, cfg in ipairs(model.inputs) do
    if cfg.name == name then return cfg end
  end
  return nil
end

local function has_output(model, name)
  for _, n in ipairs(model.outputs) do
    if n == name then return true end
  end
  return false
end

local function safe(s)  -- a name as it may appear in a reason
  return (tostring(s):sub(1, 64):gsub("[^%w_./:-]", "?"))
end

---------------------------------------------------------------------------------------------------
-- Protobuf, strictly
---------------------------------------------------------------------------------------------------

-- A canonical varint at pos (at most ``max_bytes`` bytes, no redundant trailing zero group).
local function varint(s, pos, stop, max_bytes)
  local value, shift, start = 0, 0, pos
  while pos <= stop do
    local b = s:byte(pos)
    pos = pos + 1
    if pos - start > max_bytes then return nil end
    if pos - start == 10 and b > 1 then return nil end  -- beyond 64 bits
    value = value | ((b & 0x7f) << shift)
    if b < 0x80 then
      if b == 0 and pos - start > 1 then return nil end  -- over-long: ends in a zero group
      return value, pos
    end
    shift = shift + 7
  end
  return nil
end

-- Every field of the message in s[pos..stop]: a list of {f = field, w = wire type, v = varint value,
-- or a, b = the byte range of a length-delimited value}. Only wire types 0 and 2 occur in the
-- messages checked here; anything else is refused.
local function fields(s, pos, stop)
  local out = {}
  while pos <= stop do
    local key
    key, pos = varint(s, pos, stop, 5)
    if key == nil or key > 0xffffffff then return fail("malformed protobuf tag") end
    local f, w = key >> 3, key & 7
    if f < 1 or f > 0x1fffffff then return fail("protobuf field number out of range") end
    if w == 0 then
      local v
      v, pos = varint(s, pos, stop, 10)
      if v == nil then return fail("malformed protobuf varint") end
      out[#out + 1] = { f = f, w = 0, v = v }
    elseif w == 2 then
      local n
      n, pos = varint(s, pos, stop, 5)
      if n == nil or n > stop - pos + 1 then return fail("protobuf length runs past the message") end
      out[#out + 1] = { f = f, w = 2, a = pos, b = pos + n - 1 }
      pos = pos + n
    else
      return fail("protobuf wire type " .. w .. " does not occur in this message")
    end
  end
  return out
end

-- Fields by number, checked against ``schema``: field -> {wire, repeated}. Refuses unknown fields,
-- a wrong wire type and a singular field given twice (protobuf would keep the last one).
local function by_field(list, schema, what)
  local got = {}
  for _, fld in ipairs(list) do
    local rule = schema[fld.f]
    if rule == nil then return fail(what .. ": unknown protobuf field " .. fld.f) end
    local wires = rule[1]
    if not (wires == fld.w or (type(wires) == "table" and (wires[1] == fld.w or wires[2] == fld.w))) then
      return fail(what .. ": field " .. fld.f .. " has wire type " .. fld.w)
    end
    if got[fld.f] == nil then
      got[fld.f] = { fld }
    elseif rule[2] then
      table.insert(got[fld.f], fld)
    else
      return fail(what .. ": field " .. fld.f .. " given twice")
    end
  end
  return got
end

local function bytes_of(s, fld) return s:sub(fld.a, fld.b) end

local function one_string(s, got, f)
  return got[f] and bytes_of(s, got[f][1]) or nil
end

-- map<string, InferParameter> entries: the keys and their single value's kind
local PARAMETER_ENTRY = { [1] = { 2 }, [2] = { 2 } }
local INFER_PARAMETER = { [1] = { 0 }, [2] = { 0 }, [3] = { 2 }, [5] = { 0 } }  -- 4 (double): not accepted
local PARAMETER_KIND = { [1] = "bool", [2] = "int", [3] = "string", [5] = "int" }

local function check_parameters(s, entries, allowed, what)
  local seen = {}
  for _, entry in ipairs(entries or {}) do
    local list, why = fields(s, entry.a, entry.b)
    if list == nil then return fail(what .. ": " .. why) end
    local got
    got, why = by_field(list, PARAMETER_ENTRY, what)
    if got == nil then return nil, why end
    local key = one_string(s, got, 1) or ""
    if seen[key] then return fail(what .. ": parameter '" .. safe(key) .. "' given twice") end
    seen[key] = true
    local kind = allowed[key]
    if kind == nil then return fail(what .. ": parameter '" .. safe(key) .. "' is not allowed") end
    local value = got[2] and got[2][1]
    if value == nil then return fail(what .. ": parameter '" .. safe(key) .. "' has no value") end
    local vlist
    vlist, why = fields(s, value.a, value.b)
    if vlist == nil then return fail(what .. ": " .. why) end
    if #vlist ~= 1 or PARAMETER_KIND[vlist[1].f] ~= kind then
      return fail(what .. ": parameter '" .. safe(key) .. "' must hold one " .. kind)
    end
    local _, err = by_field(vlist, INFER_PARAMETER, what)
    if err then return fail(err) end
  end
  return true
end

-- Triton's grpc_service.proto, the fields FIRE's gateway lets through
local INFER_REQUEST = {
  [1] = { 2 },         -- model_name
  [2] = { 2 },         -- model_version
  [3] = { 2 },         -- id
  [4] = { 2, true },   -- parameters (map entries)
  [5] = { 2, true },   -- inputs
  [6] = { 2, true },   -- outputs
  [7] = { 2, true },   -- raw_input_contents
}
local INFER_INPUT = {
  [1] = { 2 },               -- name
  [2] = { 2 },               -- datatype
  [3] = { { 0, 2 }, true },  -- shape: repeated int64, packed or not
  -- 4 parameters (shared memory), 5 contents (typed values): refused, send raw_input_contents
}
local INFER_OUTPUT = {
  [1] = { 2 },         -- name
  [2] = { 2, true },   -- parameters
}
local NAME_REQUEST = { [1] = { 2 }, [2] = { 2 } }  -- ModelReady / ModelMetadata / ModelConfig: name, version

local function version_ok(v)
  return v == nil or v == "" or (v:match("^[1-9]%d*$") ~= nil and #v <= 18)
end

local function shape_of(s, flds)
  local shape = {}
  for _, fld in ipairs(flds or {}) do
    if fld.w == 0 then
      shape[#shape + 1] = fld.v
    else
      local pos = fld.a
      while pos <= fld.b do
        local v
        v, pos = varint(s, pos, fld.b, 10)
        if v == nil then return fail("malformed packed shape") end
        shape[#shape + 1] = v
      end
    end
  end
  return shape
end

local function check_infer_request(s, got, model)
  local ok, why = check_parameters(s, got[4], REQUEST_PARAMETERS, "request")
  if not ok then return nil, why end
  local id = one_string(s, got, 3)
  if id and #id > 256 then return fail("request id longer than 256 bytes") end
  local inputs, raws = got[5] or {}, got[7] or {}
  if #inputs ~= #model.inputs then
    return fail("the model takes " .. #model.inputs .. " input(s), the request has " .. #inputs)
  end
  if #raws ~= #inputs then
    return fail("every input's values must come in raw_input_contents (one per input)")
  end
  local seen = {}
  for i, fld in ipairs(inputs) do
    local list
    list, why = fields(s, fld.a, fld.b)
    if list == nil then return nil, "input: " .. why end
    local t
    t, why = by_field(list, INFER_INPUT, "input")
    if t == nil then return nil, why end
    local name = one_string(s, t, 1) or ""
    local cfg = input_config(model, name)
    if cfg == nil then return fail("the model has no input '" .. safe(name) .. "'") end
    if seen[name] then return fail("input '" .. safe(name) .. "' given twice") end
    seen[name] = true
    local dtype = one_string(s, t, 2) or ""
    if dtype ~= cfg.datatype then
      return fail("input '" .. safe(name) .. "': datatype " .. safe(dtype) .. ", the model takes " .. cfg.datatype)
    end
    local shape
    shape, why = shape_of(s, t[3])
    if shape == nil then return nil, why end
    local elements
    elements, why = check_shape(shape, cfg, model.max_batch)
    if elements == nil then return nil, why end
    local raw = raws[i]
    if raw.b - raw.a + 1 ~= elements * DTYPE_SIZE[cfg.datatype] then
      return fail("input '" .. safe(name) .. "': " .. (raw.b - raw.a + 1) .. " bytes for " .. elements .. " elements")
    end
  end
  local outs = {}
  for _, fld in ipairs(got[6] or {}) do
    local list
    list, why = fields(s, fld.a, fld.b)
    if list == nil then return nil, "output: " .. why end
    local t
    t, why = by_field(list, INFER_OUTPUT, "output")
    if t == nil then return nil, why end
    local name = one_string(s, t, 1) or ""
    if not has_output(model, name) then return fail("the model has no output '" .. safe(name) .. "'") end
    if outs[name] then return fail("output '" .. safe(name) .. "' requested twice") end
    outs[name] = true
    ok, why = check_parameters(s, t[2], { classification = "int" }, "output")
    if not ok then return nil, why end
  end
  return true
end

-- The model a gRPC call names, if the call may pass; else nil and why.
local function grpc_model(method, body)
  if body == nil or #body < 5 then return fail("no complete gRPC message") end
  if body:byte(1) ~= 0 then return fail("compressed gRPC messages are not accepted") end
  local length = (body:byte(2) << 24) | (body:byte(3) << 16) | (body:byte(4) << 8) | body:byte(5)
  if #body ~= 5 + length then return fail("exactly one whole gRPC message per call") end
  local list, why = fields(body, 6, 5 + length)
  if list == nil then return nil, why end
  local infer = method == "ModelInfer"
  local got
  got, why = by_field(list, infer and INFER_REQUEST or NAME_REQUEST, method)
  if got == nil then return nil, why end
  local name = one_string(body, got, 1)
  if name == nil then return fail("the request names no model") end
  local model = SPEC.models[name]
  if model == nil then return fail("not a protected model: '" .. safe(name) .. "'") end
  if not version_ok(one_string(body, got, 2)) then return fail("bad model version") end
  if infer then
    local ok
    ok, why = check_infer_request(body, got, model)
    if not ok then return nil, why end
  end
  return name
end

---------------------------------------------------------------------------------------------------
-- HTTP inference (KServe v2 JSON, with Triton's binary tensor extension)
---------------------------------------------------------------------------------------------------

-- The scalar leaves of a JSON "data" value (nested arrays of numbers or booleans), or nil.
local function count_leaves(v, depth)
  if type(v) == "number" or type(v) == "boolean" then return 1 end
  if not is_array(v) or depth > MAX_DEPTH then return nil end
  local n = 0
  for _, item in ipairs(v) do
    local k = count_leaves(item, depth + 1)
    if k == nil then return nil end
    n = n + k
  end
  return n
end

local function check_json_parameters(params, allowed, what)
  if params == nil then return true end
  if not is_object(params) then return fail(what .. ": parameters must be an object") end
  for key, value in pairs(params) do
    local kind = allowed[key]
    if kind == nil then return fail(what .. ": parameter '" .. safe(key) .. "' is not allowed") end
    if kind == "bool" and type(value) ~= "boolean" then return fail(what .. ": '" .. key .. "' must be a boolean") end
    if kind == "int" and math.type(value) ~= "integer" then return fail(what .. ": '" .. key .. "' must be an integer") end
    if kind == "size" and (math.type(value) ~= "integer" or value < 0) then
      return fail(what .. ": '" .. key .. "' must be a byte count")
    end
  end
  return true
end

local function only_keys(obj, allowed, what)
  for key in pairs(obj) do
    if not allowed[key] then return fail(what .. ": unknown key '" .. safe(key) .. "'") end
  end
  return true
end

local INPUT_KEYS = { name = true, shape = true, datatype = true, parameters = true, data = true }
local OUTPUT_KEYS = { name = true, parameters = true }
local REQUEST_KEYS = { id = true, parameters = true, inputs = true, outputs = true }

-- Whether the JSON inference header fits the model; ``binary``: the bytes after the header.
local function check_http_infer(model, header, binary)
  local req, why = json_decode(header)
  if req == nil then return nil, why end
  if not is_object(req) then return fail("the request must be a JSON object") end
  local ok
  ok, why = only_keys(req, REQUEST_KEYS, "request")
  if not ok then return nil, why end
  if req.id ~= nil and (type(req.id) ~= "string" or #req.id > 256) then return fail("bad request id") end
  ok, why = check_json_parameters(req.parameters, REQUEST_PARAMETERS, "request")
  if not ok then return nil, why end
  local inputs = req.inputs
  if not is_array(inputs) or #inputs ~= #model.inputs then
    return fail("the model takes " .. #model.inputs .. " input(s)")
  end
  local seen, binary_total = {}, 0
  for _, inp in ipairs(inputs) do
    if not is_object(inp) then return fail("an input must be a JSON object") end
    ok, why = only_keys(inp, INPUT_KEYS, "input")
    if not ok then return nil, why end
    local cfg = type(inp.name) == "string" and input_config(model, inp.name) or nil
    if cfg == nil then return fail("the model has no input '" .. safe(inp.name) .. "'") end
    if seen[inp.name] then return fail("input '" .. safe(inp.name) .. "' given twice") end
    seen[inp.name] = true
    if inp.datatype ~= cfg.datatype then
      return fail("input '" .. cfg.name .. "': datatype " .. safe(inp.datatype) .. ", the model takes " .. cfg.datatype)
    end
    if not is_array(inp.shape) then return fail("input '" .. cfg.name .. "': shape must be an array") end
    local elements
    elements, why = check_shape(inp.shape, cfg, model.max_batch)
    if elements == nil then return nil, why end
    ok, why = check_json_parameters(inp.parameters, { binary_data_size = "size" }, "input")
    if not ok then return nil, why end
    local size = inp.parameters and inp.parameters.binary_data_size
    if size ~= nil then
      if inp.data ~= nil then return fail("input '" .. cfg.name .. "': both data and binary_data_size") end
      if size ~= elements * DTYPE_SIZE[cfg.datatype] then
        return fail("input '" .. cfg.name .. "': " .. size .. " bytes for " .. elements .. " elements")
      end
      binary_total = binary_total + size
    else
      local n = count_leaves(inp.data, 0)
      if n == nil then return fail("input '" .. cfg.name .. "': data must be an array of numbers") end
      if n ~= elements then
        return fail("input '" .. cfg.name .. "': " .. n .. " values for " .. elements .. " elements")
      end
    end
  end
  if binary_total ~= binary then
    return fail(binary .. " bytes of binary data, the inputs declare " .. binary_total)
  end
  if req.outputs ~= nil then
    if not is_array(req.outputs) then return fail("outputs must be an array") end
    local outs = {}
    for _, out in ipairs(req.outputs) do
      if not is_object(out) then return fail("an output must be a JSON object") end
      ok, why = only_keys(out, OUTPUT_KEYS, "output")
      if not ok then return nil, why end
      if type(out.name) ~= "string" or not has_output(model, out.name) then
        return fail("the model has no output '" .. safe(out.name) .. "'")
      end
      if outs[out.name] then return fail("output '" .. safe(out.name) .. "' requested twice") end
      outs[out.name] = true
      ok, why = check_json_parameters(out.parameters, OUTPUT_PARAMETERS, "output")
      if not ok then return nil, why end
    end
  end
  return true
end

local function single_header(headers, name)
  local values = headers[name]
  if values == nil then return nil, 0 end
  local n, value = 0, nil
  for _, v in pairs(values) do
    n = n + 1
    value = v
  end
  return value, n
end

-- The protected model an HTTP inference request names, if it may pass; else nil and why.
local function http_model(path, headers, body, declared)
  local name = path:match("^/v2/models/([^/]+)/infer$") or path:match("^/v2/models/([^/]+)/versions/%d+/infer$")
  local model = name and SPEC.models[name]
  if model == nil then return fail("not a protected model") end
  local encoding, n = single_header(headers, "content-encoding")
  if n > 1 or (encoding ~= nil and encoding:lower() ~= "identity") then
    return fail("compressed request bodies are not accepted")
  end
  if headers["transfer-encoding"] ~= nil or headers["content-length"] == nil then
    return fail("an inference request needs a Content-Length")
  end
  if body == nil or #body ~= declared then
    return fail("request body larger than the gateway accepts (" .. SPEC.max_body .. " bytes)")
  end
  local header_length, count = single_header(headers, "inference-header-content-length")
  if count > 1 then return fail("Inference-Header-Content-Length given twice") end
  local json_end = #body
  if header_length ~= nil then
    if not header_length:match("^%d+$") or #header_length > 12 then
      return fail("bad Inference-Header-Content-Length")
    end
    json_end = tonumber(header_length)
    if json_end > #body then return fail("Inference-Header-Content-Length exceeds the body") end
  end
  local ok, why = check_http_infer(model, body:sub(1, json_end), #body - json_end)
  if not ok then return nil, why end
  return name
end

---------------------------------------------------------------------------------------------------
-- HAProxy actions
---------------------------------------------------------------------------------------------------

local function decide(txn, name, why)
  if name then
    txn:set_var("txn.fire_model", name)  -- set only for a request that may pass
  else
    txn:set_var("txn.fire_why", ((why or "refused"):gsub("[^%w %.,:;_/()'=<>+-]", "?")))
  end
end

local function grpc_action(txn)
  local method = txn.sf:path():match("^/inference%.GRPCInferenceService/(%w+)$")
  decide(txn, grpc_model(method, txn.f:req_body()))
end

local function http_action(txn)
  local declared = txn.f:req_body_size()
  decide(txn, http_model(txn.sf:path(), txn.http:req_get_headers(), txn.f:req_body(), declared))
end

-- Plain functions for the tests (tests/test_gateway.py drives them through a real HAProxy).
FIRE_GATEWAY = { grpc_model = grpc_model, http_model = http_model, json_decode = json_decode }

if core ~= nil then
  load_spec()
  core.register_action("fire_grpc", { "http-req" }, grpc_action, 0)
  core.register_action("fire_http", { "http-req" }, http_action, 0)
end
